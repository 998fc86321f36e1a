"""A small made-up domain for the README's "Your domain" walk-through: the Corner Shop.

    python examples/shop/make_data.py --out data/shop

writes, deterministically and offline (the standard library only):

* ``shop.txt``: the domain text to pretrain on, pages of a shop guide that describe its products
  (colour, price, aisle, what each is for), one page per document, separated by ``<|endoftext|>``
  lines (``slm prepare``'s text format);
* ``qa.jsonl``: questions and answers about the same products, to fine-tune on: single questions as
  ``{"prompt", "completion"}`` records and short conversations as OpenAI ``{"messages": [...]}``
  records, some with a system prompt (``slm prepare`` recognises both forms).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SHOP = "the Corner Shop"
# name, colour, price in dollars, aisle, what it is for
PRODUCTS = [
    ("kettle", "red", 25, 3, "boils water in two minutes"),
    ("teapot", "blue", 18, 3, "makes six cups of tea"),
    ("toaster", "silver", 30, 3, "toasts four slices at once"),
    ("mug", "white", 6, 3, "keeps coffee hot for an hour"),
    ("lamp", "green", 40, 5, "gives a warm yellow light"),
    ("clock", "black", 22, 5, "rings at seven every morning"),
    ("mirror", "gold", 45, 5, "hangs by the front door"),
    ("vase", "yellow", 15, 6, "holds a dozen flowers"),
    ("candle", "orange", 8, 6, "smells like fresh oranges"),
    ("basket", "brown", 20, 6, "carries fruit home from the market"),
    ("blanket", "grey", 35, 7, "keeps you warm on cold nights"),
    ("pillow", "pink", 12, 7, "is filled with soft feathers"),
    ("rug", "purple", 60, 7, "covers a whole bedroom floor"),
]
NOT_SOLD = ["piano", "bicycle", "television", "sofa", "guitar", "fridge"]
SYSTEM = f"You are the assistant of {SHOP}. Answer in one sentence."

PRICE_Q = ["How much is the {n}?", "What does the {n} cost?", "What is the price of the {n}?",
           "How much does the {n} cost?", "Is the {n} expensive?"]
AISLE_Q = ["Where is the {n}?", "Which aisle has the {n}?", "Where can I find the {n}?", "Where do you keep the {n}?"]
USE_Q = ["What does the {n} do?", "Tell me about the {n}.", "Why would I buy the {n}?", "What is the {n} good for?"]
COLOUR_Q = ["What colour is the {n}?", "Which colour does the {n} come in?"]
MISSING_Q = ["Do you sell a {n}?", "How much is the {n}?", "Where can I find a {n}?"]


def answers(name: str, colour: str, price: int, aisle: int, use: str) -> dict[str, str]:
    return {"price": f"The {colour} {name} costs {price} dollars.",
            "aisle": f"The {colour} {name} is in aisle {aisle}.",
            "use": f"The {colour} {name} {use}.",
            "colour": f"The {name} is {colour}."}


def questions(rng: random.Random) -> list[tuple[str, str]]:
    """Every (question, answer) pair: each product asked about in every phrasing, and the products
    the shop does not sell."""
    pairs = []
    for name, colour, price, aisle, use in PRODUCTS:
        a = answers(name, colour, price, aisle, use)
        for kind, phrasings in (("price", PRICE_Q), ("aisle", AISLE_Q), ("use", USE_Q), ("colour", COLOUR_Q)):
            for q in phrasings:
                # Ask for "the kettle" and for "the red kettle": both mean the same product.
                pairs.append((q.format(n=name), a[kind]))
                if kind != "colour":
                    pairs.append((q.format(n=f"{colour} {name}"), a[kind]))
    for name in NOT_SOLD:
        for q in MISSING_Q:
            pairs.append((q.format(n=name), f"Sorry, {SHOP} does not sell a {name}."))
    rng.shuffle(pairs)
    return pairs


def page(rng: random.Random) -> str:
    """One page of the shop guide: a few products described in varied sentences."""
    lines = [rng.choice([f"Welcome to {SHOP}.", f"A walk through {SHOP}.", f"Today at {SHOP}."])]
    for name, colour, price, aisle, use in rng.sample(PRODUCTS, rng.randint(3, 6)):
        details = [f"It costs {price} dollars.", f"It {use}."]
        rng.shuffle(details)
        facts = [f"The {colour} {name} is in aisle {aisle}.", *details]
        if rng.random() < 0.3:
            facts = [f"In aisle {aisle} you find the {colour} {name}, for {price} dollars.", f"The {name} {use}."]
        lines.append(" ".join(facts))
    if rng.random() < 0.3:
        lines.append(f"{SHOP.capitalize()} does not sell a {rng.choice(NOT_SOLD)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/shop"), help="folder to write (default data/shop)")
    parser.add_argument("--pages", type=int, default=2000, help="documents of shop text (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    text = "".join(page(rng) + "\n<|endoftext|>\n" for _ in range(args.pages))
    (args.out / "shop.txt").write_text(text, encoding="utf-8")

    pairs = questions(rng)
    records = []
    for question, answer in pairs:  # one question each
        records.append({"prompt": question, "completion": answer})
    for _ in range(len(pairs) // 2):  # and short conversations of two or three questions
        turns = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for question, answer in rng.sample(pairs, rng.randint(2, 3)):
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": turns})
    rng.shuffle(records)
    with open(args.out / "qa.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {args.out / 'shop.txt'} ({args.pages} pages, {len(text) / 1e6:.1f} MB) and "
          f"{args.out / 'qa.jsonl'} ({len(records)} records)")


if __name__ == "__main__":
    main()
