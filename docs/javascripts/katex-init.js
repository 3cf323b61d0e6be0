// Render the maths that pymdownx.arithmatex (generic mode) leaves in the page, with the
// KaTeX files served from docs/assets/katex (no CDN at view time).
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
  });
});
