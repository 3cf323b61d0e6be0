"""Generate the ``demo`` task: short English reviews labelled negative/positive.

The reviews are composed from templates written for this project (no external
data set is used). The script is deterministic for a given ``--seed`` and
writes ``demo_train.jsonl``, ``demo_validation.jsonl`` and ``demo_test.jsonl``
next to itself, one ``{"text": str, "label": 0 | 1}`` object per line
(0 = negative, 1 = positive).

The task is meant to be learnable but not perfectly: besides plain reviews it
contains negations ("not bad at all"), contrasts whose overall verdict decides
the label, genuinely mixed reviews whose label is a coin flip, and a few
randomly flipped labels. A model that fits the training set therefore becomes
overconfident, which is what the Laplace demo needs to show.

Examples:
    Regenerate the committed files (from the repository root)::

        python flaplace/data/make_demo_data.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SPLIT_SIZES = {"train": 500, "validation": 200, "test": 200}
NOISE_RATE = 0.05  # share of labels flipped at random after composition
KIND_WEIGHTS = {"plain": 0.50, "negated": 0.22, "contrast": 0.16, "mixed": 0.12}

# domain -> (things reviewed, aspects, openers)
DOMAINS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "restaurant": (
        ["this restaurant", "the bistro", "this little trattoria", "the noodle bar"],
        ["food", "service", "pasta", "dessert", "wine list", "atmosphere", "portions", "waiter"],
        ["We had dinner here on a Friday.", "Came for a birthday lunch.", "Booked a table for four."],
    ),
    "hotel": (
        ["this hotel", "the guesthouse", "the resort", "this hostel"],
        ["room", "bed", "front desk staff", "breakfast", "location", "pool", "shower", "check-in"],
        ["We stayed three nights.", "Spent a weekend here.", "Stayed here for a conference."],
    ),
    "phone": (
        ["this phone", "the handset", "this smartphone"],
        ["battery", "screen", "camera", "speaker", "charger", "software", "fingerprint reader"],
        ["I have used it for a month.", "Upgraded from an older model.", "Bought it on sale."],
    ),
    "headphones": (
        ["these headphones", "the earbuds", "this headset"],
        ["sound", "noise cancelling", "fit", "bass", "microphone", "carrying case", "battery"],
        ["I wear them on my commute.", "Got them as a gift.", "Used them for a few weeks."],
    ),
    "laptop": (
        ["this laptop", "the notebook", "this ultrabook"],
        ["keyboard", "trackpad", "fan", "display", "battery life", "hinge", "webcam"],
        ["I use it for work every day.", "Bought it for university.", "Replaced my old machine."],
    ),
    "film": (
        ["this film", "the movie", "this thriller", "the sequel"],
        ["plot", "acting", "soundtrack", "ending", "pacing", "dialogue", "cinematography"],
        ["Saw it at the cinema.", "Watched it with friends.", "Streamed it last night."],
    ),
    "book": (
        ["this novel", "the book", "this memoir"],
        ["characters", "prose", "plot twists", "final chapters", "world-building", "translation"],
        ["Read it on holiday.", "Our book club picked it.", "Finished it in two days."],
    ),
    "airline": (
        ["this airline", "the carrier", "this flight"],
        ["seats", "cabin crew", "legroom", "boarding", "meal", "delay handling", "baggage service"],
        ["Flew with them to Lisbon.", "Took a long-haul flight.", "Booked a last-minute ticket."],
    ),
    "cafe": (
        ["this café", "the coffee shop", "this bakery"],
        ["espresso", "pastries", "barista", "wifi", "seating", "croissants", "iced tea"],
        ["Stopped by before work.", "Met a friend here.", "Worked here all afternoon."],
    ),
    "appliance": (
        ["this blender", "the vacuum cleaner", "this kettle", "the coffee machine"],
        ["motor", "build quality", "noise level", "controls", "cleaning", "power cord", "lid"],
        ["Ordered it online.", "Used it daily for two weeks.", "Replaced a broken one with it."],
    ),
    "game": (
        ["this game", "the sequel", "this puzzle game"],
        ["story", "controls", "graphics", "level design", "multiplayer", "music", "difficulty"],
        ["Played it over the weekend.", "Finished the main campaign.", "Tried it with my kids."],
    ),
    "gym": (
        ["this gym", "the fitness club", "this yoga studio"],
        ["equipment", "trainers", "changing rooms", "classes", "opening hours", "membership fees"],
        ["Been a member for three months.", "Tried the free week.", "I go there after work."],
    ),
}

POSITIVE = [
    "was excellent",
    "was superb",
    "exceeded my expectations",
    "was a delight",
    "was spot on",
    "felt premium",
    "worked flawlessly",
    "was wonderful",
    "blew me away",
    "was genuinely impressive",
    "was lovely",
    "was top-notch",
    "was better than I hoped",
    "was a real highlight",
    "was brilliant",
    "was charming",
    "was fantastic",
    "did exactly what it should",
    "was thoughtfully done",
    "was a pleasant surprise",
]
NEGATIVE = [
    "was terrible",
    "was a letdown",
    "fell apart within a week",
    "was awful",
    "was bland",
    "was painfully slow",
    "kept failing",
    "was disappointing",
    "felt cheap",
    "was a complete mess",
    "was overpriced for what it is",
    "left a lot to be desired",
    "was frustrating",
    "was mediocre",
    "was a waste of money",
    "was dreadful",
    "annoyed me constantly",
    "was sloppy",
    "was underwhelming",
    "broke on the second day",
]
NEGATED_POSITIVE = [  # negated wording, positive meaning
    "was not bad at all",
    "wasn't disappointing in the slightest",
    "never once let me down",
    "had no real flaws",
    "could not have been better",
    "was far from boring",
    "gave me nothing to complain about",
    "was not the disaster I feared",
    "didn't disappoint",
    "was never anything less than good",
]
NEGATED_NEGATIVE = [  # negated wording, negative meaning
    "was not great",
    "wasn't worth the money",
    "was nothing special",
    "didn't live up to the hype",
    "was hardly impressive",
    "was not what I paid for",
    "never really worked properly",
    "wasn't good enough",
    "did not impress anyone",
    "was no better than the cheap ones",
]
VERDICT_POSITIVE = [
    "Highly recommended.",
    "Would definitely come back.",
    "I'd buy it again.",
    "Five stars from me.",
    "Worth every penny.",
    "Can't wait to return.",
    "I'm very happy with it.",
    "A keeper.",
    "Overall a great experience.",
    "I'd recommend it to anyone.",
]
VERDICT_NEGATIVE = [
    "Avoid.",
    "Never again.",
    "I returned it.",
    "Save your money.",
    "One star.",
    "Not recommended.",
    "Overall a poor experience.",
    "I regret it.",
    "Look elsewhere.",
    "I want a refund.",
]
VERDICT_HEDGED = [
    "Mixed feelings overall.",
    "I'm on the fence.",
    "Hard to say if I'd go back.",
    "It is what it is.",
    "Make of that what you will.",
    "Not sure what to think.",
    "Some good, some bad.",
    "Your mileage may vary.",
]
INTENSIFIERS = ["", "", "", "really ", "honestly ", "frankly ", "truly "]
CONNECTIVES_SAME = ["and", "and also", "and on top of that", "plus"]


def clause(rng: random.Random, aspect: str, predicate: str) -> str:
    """One aspect clause, e.g. ``the battery really was excellent``."""
    if aspect.endswith("s") and aspect != "bass":  # plural aspect: fix the verb
        predicate = re.sub(r"^was(n't)?\b", lambda m: "were" + (m.group(1) or ""), predicate)
    intensifier = rng.choice(INTENSIFIERS)
    if intensifier and predicate.startswith(("was ", "were ")):
        return f"the {aspect} {intensifier}{predicate}"
    return f"the {aspect} {predicate}"


def sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop."""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def compose(rng: random.Random, kind: str, positive: bool) -> str:
    """Compose one review of the given kind whose intended sentiment is ``positive``."""
    things, aspects, openers = DOMAINS[rng.choice(sorted(DOMAINS))]
    thing = rng.choice(things)
    first, second = rng.sample(aspects, 2)
    good, bad = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
    verdict = rng.choice(VERDICT_POSITIVE if positive else VERDICT_NEGATIVE)
    parts: list[str] = []
    if rng.random() < 0.4:
        parts.append(rng.choice(openers))
    if kind == "plain":
        body = clause(rng, first, rng.choice(good))
        if rng.random() < 0.5:
            body += f" {rng.choice(CONNECTIVES_SAME)} {clause(rng, second, rng.choice(good))}"
        parts.append(sentence(body))
        if rng.random() < 0.5:
            parts.append(verdict)
    elif kind == "negated":
        negated = NEGATED_POSITIVE if positive else NEGATED_NEGATIVE
        parts.append(sentence(clause(rng, first, rng.choice(negated))))
        if rng.random() < 0.3:
            parts.append(sentence(f"as for {thing}, {clause(rng, second, rng.choice(negated))}"))
        elif rng.random() < 0.4:
            parts.append(verdict)
    elif kind == "contrast":
        opposite = clause(rng, first, rng.choice(bad))
        same = clause(rng, second, rng.choice(good))
        template = rng.randrange(3)
        if template == 0:
            parts.append(sentence(f"{opposite}, but {same}"))
        elif template == 1:
            parts.append(sentence(f"although {opposite}, {same}"))
        else:
            parts.append(sentence(f"{opposite}. Still, {same}"))
        parts.append(verdict)
    elif kind == "mixed":
        pro = clause(rng, first, rng.choice(POSITIVE))
        con = clause(rng, second, rng.choice(NEGATIVE))
        pro, con = (pro, con) if rng.random() < 0.5 else (con, pro)
        parts.append(sentence(f"{pro}, while {con}"))
        parts.append(rng.choice(VERDICT_HEDGED))
    else:
        raise ValueError(f"unknown review kind {kind!r}")
    return " ".join(parts)


def generate(seed: int) -> dict[str, list[dict[str, object]]]:
    """Return ``{split: [{"text", "label"}, ...]}`` with distinct texts across all splits."""
    rng = random.Random(seed)
    total = sum(SPLIT_SIZES.values())
    kinds, weights = zip(*KIND_WEIGHTS.items(), strict=True)
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    while len(rows) < total:
        kind = rng.choices(kinds, weights)[0]
        positive = len(rows) % 2 == 0  # balanced intended sentiment
        text = compose(rng, kind, positive)
        if text in seen:
            continue
        seen.add(text)
        label = int(positive)
        if kind == "mixed":
            label = rng.randrange(2)  # genuinely ambiguous: the label is a coin flip
        if rng.random() < NOISE_RATE:
            label = 1 - label
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    splits: dict[str, list[dict[str, object]]] = {}
    start = 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = rows[start : start + size]
        start += size
    return splits


def main() -> None:
    """Write the demo splits as JSON lines next to this script (or into ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.seed).items():
        path = args.out / f"demo_{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
