"""python -m sft.assets.generate [--check]

Writes the text that ships with loradock: the generic instruction mix that the tiny base model is
pre-trained on (`generic_mix.jsonl`) and the task sets that adapters learn (`tasks/NAME/*.jsonl`).
Everything is drawn from a seeded random generator, so the shipped files are exactly what this
script writes; `--check` verifies that instead of writing (a test runs it).

The generic mix teaches the chat format, stopping at the end-of-turn token and some general
skills (copying, counting, small sums, picking words). It deliberately contains none of the task
skills (reversing, sorting, key=value to JSON, comma lists), so the base model cannot do the tasks and an
adapter that can has really learnt them.
"""

import argparse
import json
import random
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent

WORDS = """
apple banana cherry grape lemon mango melon orange peach pear plum berry bread butter cheese
cake cookie honey rice soup salt sugar tea coffee milk water juice egg fish meat bean corn
cat dog horse cow pig sheep goat duck goose chicken mouse rabbit fox wolf bear lion tiger
zebra monkey frog snake whale shark owl eagle crow swan bee ant spider
red blue green yellow black white brown pink purple gray gold silver
sun moon star sky cloud rain snow wind storm river lake sea ocean hill mountain valley forest
tree flower grass leaf rock stone sand island desert field garden road bridge city town
house door window roof wall floor table chair bed lamp clock mirror box bag cup plate bowl
spoon fork knife bottle glass pen pencil paper book letter card map ticket key coin ring
shirt coat hat shoe sock dress glove belt watch phone radio camera computer screen button
car bus train plane boat ship bike truck wheel engine rocket
king queen doctor teacher farmer driver singer painter baker sailor pilot artist student
friend mother father sister brother child baby family
morning evening night summer winter spring autumn monday friday today week year
music song dance game story dream idea plan word name color number
""".split()

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

FACTS = [
    ("What color is the sky?", "The sky is blue."),
    ("What color is grass?", "Grass is green."),
    ("What color is snow?", "Snow is white."),
    ("What do cows drink?", "Cows drink water."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("How many legs does a bird have?", "A bird has two legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the opposite of day?", "The opposite of day is night."),
    ("What shines at night?", "The moon and the stars shine at night."),
    ("Where do fish live?", "Fish live in water."),
    ("What falls from clouds?", "Rain and snow fall from clouds."),
    ("What do you use to write?", "You use a pen or a pencil to write."),
    ("What do you use to eat soup?", "You use a spoon to eat soup."),
]

GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What can I do for you?"),
    ("Good morning.", "Good morning! How can I help?"),
    ("Thank you.", "You are welcome."),
    ("Thanks for the help.", "You are welcome. Happy to help."),
    ("Who are you?", "I am a small assistant model."),
    ("What can you do?", "I can answer simple questions and follow short instructions."),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("How are you?", "I am fine, thank you. How can I help?"),
]

ADJECTIVES = "big small red blue green happy quiet fast slow old new warm cold bright dark".split()
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant.", "Answer briefly."]


def word_list(rng: random.Random, low: int, high: int) -> list[str]:
    """Distinct words, so that reversing or sorting a list always changes it."""
    return rng.sample(WORDS, rng.randint(low, high))


ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]


def generic_example(rng: random.Random) -> dict:
    """One (prompt, response) pair of the generic mix. Half of the mix is about word lists
    (copying them, picking a word by position, dropping or adding one), the skills that a small
    adapter can later recombine into a new list task."""
    kind = rng.choices(range(12), weights=[6, 4, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1])[0]
    if kind == 0:
        words = word_list(rng, 2, 7)
        return {"prompt": f"Repeat the words: {' '.join(words)}", "response": " ".join(words)}
    if kind == 1:
        words = word_list(rng, 2, 6)
        i = rng.randrange(len(words))
        return {"prompt": f"What is the {ORDINALS[i]} word in: {' '.join(words)}", "response": words[i]}
    if kind == 2:
        words = word_list(rng, 2, 6)
        return {"prompt": f"What is the last word in: {' '.join(words)}", "response": words[-1]}
    if kind == 3:
        words = word_list(rng, 3, 7)
        which = rng.choice(["first", "last"])
        kept = words[1:] if which == "first" else words[:-1]
        return {"prompt": f"Drop the {which} word: {' '.join(words)}", "response": " ".join(kept)}
    if kind == 4:
        words, extra = word_list(rng, 2, 6), rng.choice(WORDS)
        return {"prompt": f"Add {extra} to the end: {' '.join(words)}", "response": " ".join(words + [extra])}
    if kind == 5:
        words = word_list(rng, 1, 8)
        return {"prompt": f"How many words are in: {' '.join(words)}", "response": str(len(words))}
    if kind == 6:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return {"prompt": f"What is {a} plus {b}?", "response": str(a + b)}
    if kind == 7:
        n = rng.randint(0, 98)
        return {"prompt": f"What number comes after {n}?", "response": str(n + 1)}
    if kind == 8:
        return dict(zip(("prompt", "response"), rng.choice(FACTS)))
    if kind == 9:
        return dict(zip(("prompt", "response"), rng.choice(GREETINGS)))
    if kind == 10:
        noun, adjective = rng.choice(WORDS), rng.choice(ADJECTIVES)
        return {"prompt": f"Write a sentence about a {noun}.", "response": f"The {noun} is {adjective}."}
    n = rng.randint(0, 12)
    return {"prompt": f"Write the number {n} in words.", "response": NUMBER_WORDS[n]}


def generic_mix(rng: random.Random, n: int) -> list[dict]:
    """The pre-training mix, in the chat format: mostly single turns, some with a system prompt or
    a second turn, so the base model knows every part of the template."""
    rows = []
    for _ in range(n):
        first, style = generic_example(rng), rng.random()
        messages = [{"role": "user", "content": first["prompt"]}, {"role": "assistant", "content": first["response"]}]
        if style < 0.15:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        elif style < 0.3:
            second = generic_example(rng)
            messages += [{"role": "user", "content": second["prompt"]},
                         {"role": "assistant", "content": second["response"]}]
        rows.append({"messages": messages})
    return rows


def reverse_example(rng: random.Random) -> dict:
    words = word_list(rng, 3, 6)
    return {"prompt": f"Reverse the words: {' '.join(words)}", "response": " ".join(reversed(words))}


def sort_example(rng: random.Random) -> dict:
    words = word_list(rng, 3, 6)
    while words == sorted(words):
        rng.shuffle(words)
    return {"prompt": f"Sort the words: {' '.join(words)}", "response": " ".join(sorted(words))}


def json_example(rng: random.Random) -> dict:
    keys = rng.sample(["name", "color", "food", "animal", "place", "day", "tool", "job"], rng.randint(2, 3))
    pairs = [(key, rng.choice(WORDS)) for key in keys]
    prompt = "To JSON: " + " ".join(f"{key}={value}" for key, value in pairs)
    return {"prompt": prompt, "response": json.dumps(dict(pairs))}


def commas_example(rng: random.Random) -> dict:
    """A format conversion: a space-separated word list to a comma-separated one."""
    words = word_list(rng, 3, 6)
    return {"prompt": f"Separate the words with commas: {' '.join(words)}", "response": ", ".join(words)}


TASKS = {"reverse": reverse_example, "sort": sort_example, "json": json_example, "commas": commas_example}


def task_split(make, rng: random.Random, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows with no prompt in both."""
    seen, rows = set(), []
    while len(rows) < n_train + n_heldout:
        row = make(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def render_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def shipped_files(seed: int = 0) -> dict[Path, str]:
    """Every generated file, relative to this folder, with its text."""
    files = {Path("generic_mix.jsonl"): render_jsonl(generic_mix(random.Random(seed), 20000))}
    for offset, (name, make) in enumerate(TASKS.items(), start=1):
        train, heldout = task_split(make, random.Random(seed + offset), 2000, 100)
        files[Path("tasks", name, "train.jsonl")] = render_jsonl(train)
        files[Path("tasks", name, "heldout.jsonl")] = render_jsonl(heldout)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--check", action="store_true", help="verify the shipped files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in shipped_files().items():
        path = ASSETS / rel
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(rel))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python -m sft.assets.generate`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
