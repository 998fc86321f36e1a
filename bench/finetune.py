"""Instruction following, base vs full fine-tune vs LoRA: does fine-tuning teach a small model a task?

    python bench/finetune.py                       # every stage, ~20 minutes on 2 CPU cores
    python bench/finetune.py --stage base          # or one stage at a time (each resumes / reuses
    python bench/finetune.py --stage full          #   what the earlier ones left in --work)
    python bench/finetune.py --stage lora
    python bench/finetune.py --stage score         # writes bench/results/finetune.json
    python bench/finetune.py --smoke               # seconds: a toy corpus, a tiny model, a tmp dir

**The task**, as in the TinyStories paper's instruct set (Eldan & Li 2023, section 4.2): an
instruction names three words that the story must use, a noun, a verb and an adjective, and
sometimes a feature (here: dialogue, which can be checked: the story has a quotation mark); the
response is the story. The words are drawn from the story itself (``NOUNS``, ``VERBS``,
``ADJECTIVES``: common words of children's stories, matched in any inflection), so the response
always uses them. Offline, from the shared TinyStories sample:

* **data**: ``train.txt`` less its last 500 stories (bench/quality.py's test split, never trained
  on) is the pretraining text and its tokenizer (BPE, vocab 4096, ``quality.prepare_data``); every
  training story that holds a word of each list becomes an instruction record (OpenAI messages form)
  prepared with ``slm prepare --tokenizer-from`` (the SFT DATA_DIR, val 5% of them); the held-out
  stories that fit the context become the prompts scored below and a second SFT DATA_DIR whose val
  split is them (for ``slm eval --data``);
* **base**: ``slm train --preset cpu-15min`` (4 x 192, context 256, eager) for ``--base-time``;
* **full** / **lora**: ``slm finetune`` of the base on the SFT set for ``--ft-time`` each (LoRA:
  rank 8 on the four projections, the added chat tokens' rows trained too);
* **score**: each model answers every held-out prompt (sampled, temperature 0.7, seed 1, up to
  ``--max-new-tokens``): the base gets the instruction as plain text (``<|endoftext|>`` +
  instruction + newline: a base model only continues text), the fine-tuned runs get it as a user
  turn of their chat template (``slm generate --chat``). Reported per model: the share of required
  words its stories use, the share that use all three, dialogue when asked for, the share of replies
  that end by themselves (before the token limit), the loss of the held-out stories given their
  instruction (nats per story token; the base with the plain-text prompt), ``slm eval --data
  HELDOUT``'s loss and accuracy on the supervised tokens (story + ``<|end|>``; the base with the
  chat tokens at the mean embedding, as fine-tuning starts them), training time and trainable
  parameters. The "chance" row scores another held-out story against each prompt's words: what a
  story that ignores the instruction gets.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import machine_info  # noqa: E402
from quality import EOT_LINE, SHARED, TEST_STORIES, parse_seconds, prepare_data, read_stories, write_stories  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "finetune.json"
WORK = ROOT / "runs" / "bench-finetune"
STAGES = ("base", "full", "lora", "score")
SAMPLE = dict(temperature=0.7, top_k=200, top_p=0.95, seed=1)
BATCH = 50  # prompts generated together

# --------------------------------------------------------------------------- the words

NOUNS = """ball cat dog tree park house box toy car bird flower cake fish boat sun garden school book hat bed door
window sky rain star moon apple bear bunny frog duck horse cow king princess dragon forest river lake hill rock
stick kite doll truck train shoe shirt cookie candy pie milk juice bag rope leaf grass sand beach shell ship rocket
robot jar cup bowl key map treasure balloon puppy kitten mouse owl bee butterfly snake lion monkey elephant castle
cloud snow flag bike pool swing slide blanket pillow sock hole nest egg carrot seed""".split()
IRREGULAR_PLURALS = {"mouse": "mice", "leaf": "leaves", "puppy": "puppies", "bunny": "bunnies", "candy": "candies",
                     "butterfly": "butterflies", "sky": "skies", "cookie": "cookies", "key": "keys", "toy": "toys"}
VERBS = {  # base form: its inflections (regular ones are made by verb_forms)
    "run": "runs ran running", "jump": "", "play": "", "look": "", "find": "finds found finding",
    "see": "sees saw seen seeing", "help": "", "share": "", "climb": "", "swim": "swims swam swimming",
    "fly": "flies flew flying", "eat": "eats ate eaten eating", "give": "gives gave given giving",
    "take": "takes took taken taking", "make": "makes made making", "build": "builds built building",
    "catch": "catches caught catching", "throw": "throws threw thrown throwing", "sing": "sings sang sung singing",
    "dance": "", "laugh": "", "cry": "cries cried crying", "hug": "hugs hugged hugging", "smile": "", "open": "",
    "walk": "", "hide": "hides hid hidden hiding", "fall": "falls fell fallen falling",
    "break": "breaks broke broken breaking", "fix": "fixes fixed fixing", "paint": "", "read": "reads reading",
    "draw": "draws drew drawn drawing", "carry": "carries carried carrying", "push": "pushes pushed pushing",
    "pull": "", "win": "wins won winning", "lose": "loses lost losing", "learn": "", "bake": "", "wash": "washes washed washing",
    "hold": "holds held holding", "sleep": "sleeps slept sleeping", "kick": "", "ride": "rides rode ridden riding",
    "chase": "", "explore": "", "listen": "", "touch": "touches touched touching", "pick": "",
    "drop": "drops dropped dropping", "grow": "grows grew grown growing", "wait": "", "shout": "", "whisper": "",
}
ADJECTIVES = """happy sad big little small red blue green yellow pink purple brown black white shiny soft hard loud
quiet kind brave scared angry funny silly pretty beautiful tall fast slow hot cold warm wet dry dark bright old new
tiny huge fluffy sweet yummy gentle curious excited tired hungry sleepy proud lonely careful strong dirty special
colorful friendly grumpy smart""".split()


def noun_forms(noun: str) -> set[str]:
    plural = IRREGULAR_PLURALS.get(noun) or (noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s")
    return {noun, plural}


def verb_forms(verb: str) -> set[str]:
    given = VERBS[verb].split()
    if given:
        return {verb, *given}
    if verb.endswith("e"):
        return {verb, verb + "s", verb + "d", verb[:-1] + "ing"}
    return {verb, verb + "s", verb + "ed", verb + "ing"}


LISTS = {"noun": {w: noun_forms(w) for w in NOUNS}, "verb": {w: verb_forms(w) for w in VERBS},
         "adjective": {w: {w} for w in ADJECTIVES}}
WORD = re.compile(r"[a-z]+")


def words_of(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def uses(text_words: set[str], kind: str, word: str) -> bool:
    """Whether a text (its set of lower-case words) uses ``word`` of list ``kind`` in any inflection."""
    return bool(LISTS[kind][word] & text_words)


def has_dialogue(text: str) -> bool:
    return '"' in text or "\u201c" in text


def instruction_for(story: str, rng: random.Random) -> dict[str, Any] | None:
    """The instruction of a story: a noun, a verb and an adjective it uses (drawn at random among
    those it uses) and, for half the stories with dialogue, the dialogue feature; None when the
    story uses no word of some list."""
    present = words_of(story)
    picked = {}
    for kind, table in LISTS.items():
        found = sorted(w for w, forms in table.items() if forms & present)
        if not found:
            return None
        picked[kind] = rng.choice(found)
    dialogue = has_dialogue(story) and rng.random() < 0.5
    words = [picked["noun"], picked["verb"], picked["adjective"]]
    text = f'Write a short story that uses the words "{words[0]}", "{words[1]}" and "{words[2]}".'
    if dialogue:
        text += " The story should have some dialogue."
    return {"instruction": text, "words": picked, "dialogue": dialogue}


def score_text(text: str, task: dict[str, Any]) -> dict[str, float]:
    present = words_of(text)
    used = [uses(present, kind, w) for kind, w in task["words"].items()]
    return {"words": sum(used) / 3, "all_words": float(all(used)), "dialogue": float(has_dialogue(text))}


# --------------------------------------------------------------------------- stages


def build_sets(stories_train: list[str], stories_test: list[str], work: Path, context: int, seed: int) -> dict:
    """The instruction records (train, held-out) and the two SFT DATA_DIRs; kept when already made."""
    from slmkit.chat import render_ids
    from slmkit.prepare_chat import prepare_chat
    from slmkit.tokenizer import load_tokenizer

    done = work / "sets.json"
    if done.exists():
        return json.loads(done.read_text())
    rng = random.Random(seed)

    def records(stories: list[str]) -> list[dict[str, Any]]:
        out = []
        for story in stories:
            task = instruction_for(story, rng)
            if task is not None:
                out.append({**task, "story": story})
        return out

    train, test = records(stories_train), records(stories_test)
    tok = None
    sft, heldout = work / "sft", work / "heldout"

    def write_jsonl(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                         {"role": "assistant", "content": r["story"]}]}) + "\n"
                                for r in rows), encoding="utf-8")

    write_jsonl(work / "sft_train.jsonl", train)
    meta, _ = prepare_chat([work / "sft_train.jsonl"], [], sft, work / "data", context=context, seed=seed)
    tok = load_tokenizer(sft)
    fits = [r for r in test if len(render_ids([("user", r["instruction"]), ("assistant", r["story"])], tok,
                                              tok.chat_template)[0]) <= context + 1]
    (work / "prompts.json").write_text(json.dumps(fits, indent=1) + "\n", encoding="utf-8")
    write_jsonl(work / "heldout.jsonl", fits)
    prepare_chat([work / "heldout.jsonl"], [work / "heldout.jsonl"], heldout, work / "data", context=context)
    sets = {"train_records": len(train), "train_stories": len(stories_train), "sft_train": meta["train"],
            "sft_val": meta["val"], "heldout_stories": len(stories_test), "heldout_records": len(test),
            "heldout_prompts": len(fits), "dialogue_asked": sum(r["dialogue"] for r in fits)}
    done.write_text(json.dumps(sets, indent=2) + "\n")
    return sets


def stage_data(args, work: Path) -> dict:
    if args.smoke:
        train_txt, valid_txt = smoke_corpus(work / "corpus")
        test_n, vocab = 20, 400
    else:
        train_txt, valid_txt = SHARED / "train.txt", SHARED / "valid.txt"
        test_n, vocab = TEST_STORIES, 4096
    split = prepare_data(work / "data", train_txt, valid_txt, test_n, vocab)
    stories = read_stories(train_txt)
    test = stories[-test_n:]
    train = [s for s in stories[:-test_n] if s not in set(test)]
    sets = build_sets(train, test, work, args.context, seed=1337)
    return {"split": split, **sets}


def read_stages(work: Path) -> dict[str, dict]:
    """What each training stage recorded, its command with paths relative to the repository."""
    stages = json.loads((work / "stages.json").read_text())
    for record in stages.values():
        record["command"] = record["command"].replace(str(ROOT) + "/", "")
    return stages


def save_stage(work: Path, name: str, record: dict) -> None:
    path = work / "stages.json"
    stages = json.loads(path.read_text()) if path.exists() else {}
    stages[name] = record
    path.write_text(json.dumps(stages, indent=2) + "\n")


def stage_base(args, work: Path) -> None:
    from slmkit.train import train

    overrides = ["train.compile=false", f"model.block_size={args.context}"] + args.base_overrides
    t0 = time.time()
    summary = train(work / "data", work / "base", preset=args.preset, overrides=overrides, max_time=args.base_time,
                    quiet=True)
    cmd = (f"slm train --data {work / 'data'} --out {work / 'base'} --preset {args.preset} --max-time {args.base_time} "
           + " ".join(overrides))
    save_stage(work, "base", {**summary, "wall_s": round(time.time() - t0, 1), "command": cmd})


def stage_finetune(args, work: Path, name: str) -> None:
    from slmkit.finetune import finetune
    from slmkit.lora import LoRAConfig

    lora = LoRAConfig() if name == "lora" else None
    lr = args.lora_lr if lora else args.full_lr
    overrides = args.ft_overrides + ([f"train.lr={lr:g}"] if lr else [])
    t0 = time.time()
    summary = finetune(work / "base", work / "sft", work / name, lora=lora, overrides=overrides,
                       max_time=args.ft_time, quiet=True)
    cmd = (f"slm finetune {work / 'base'} --data {work / 'sft'} --out {work / name} --max-time {args.ft_time}"
           + (" --lora" if lora else "") + "".join(" " + o for o in overrides))
    save_stage(work, name, {**summary, "wall_s": round(time.time() - t0, 1), "command": cmd})


# --------------------------------------------------------------------------- scoring


def trainable(work: Path, name: str, model) -> int:
    """Parameters a run trained: all of them (base, full), or the adapters plus the added tokens' rows (LoRA)."""
    if name != "lora":
        return sum(p.numel() for p in model.parameters())
    from safetensors import safe_open

    from slmkit.lora import ADAPTER_WEIGHTS

    with safe_open(str(work / name / "adapter" / ADAPTER_WEIGHTS), "pt") as f:
        adapters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    meta = json.loads((work / "sft" / "meta.json").read_text())
    new_rows = meta["vocab_size"] - meta["base_vocab_size"]
    return adapters + new_rows * model.config.n_embd * (1 if model.config.tie_embeddings else 2)


def prompt_ids(name: str, tok, task: dict) -> list[int]:
    if name == "base":
        return [tok.eot_id] + tok.encode(task["instruction"] + "\n")
    from slmkit.chat import render_prompt

    return render_prompt([("user", task["instruction"])], tok, tok.chat_template)


def story_loss(model, tok, name: str, tasks: list[dict]) -> float:
    """Mean loss (nats) of the held-out stories' tokens given their instruction prompt."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.inference_mode():
        for task in tasks:
            prompt, story = prompt_ids(name, tok, task), tok.encode(task["story"])
            ids = (prompt + story)[: model.config.block_size + 1]
            x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
            logits = model(x)[0][0]
            first = len(prompt) - 1  # the target of position len(prompt) - 1 is the story's first token
            total += F.cross_entropy(logits[first:].float(), y[first:], reduction="sum").item()
            count += len(y) - first
    return total / count


def answers(model, tok, name: str, tasks: list[dict], max_new: int) -> list[tuple[str, bool]]:
    """Each task's reply text and whether it ended by itself (before ``max_new`` tokens)."""
    from slmkit.generate import ChatSession, SamplingConfig, generate_tokens

    cfg = SamplingConfig(max_new_tokens=max_new, **SAMPLE)
    stop, hidden = (), frozenset(tok.special_ids)
    if name != "base":
        stop = ChatSession(tok).stop_ids
    out = []
    for i in range(0, len(tasks), BATCH):
        batch = [prompt_ids(name, tok, t) for t in tasks[i:i + BATCH]]
        for tokens in generate_tokens(model, batch, cfg, tok.eot_id, stop_ids=stop):
            out.append((tok.decode([t for t in tokens if t not in hidden]), len(tokens) < max_new))
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def stage_score(args, work: Path, sets: dict) -> dict:
    import torch

    from slmkit.checkpoint import load_run
    from slmkit.evaluate import evaluate_run

    tasks = json.loads((work / "prompts.json").read_text())[: args.prompts]
    stages = read_stages(work)
    rows, examples = {}, []
    chance = [score_text(other["story"], t) for t, other in zip(tasks, tasks[1:] + tasks[:1])]
    asked = [i for i, t in enumerate(tasks) if t["dialogue"]]
    rows["chance (another held-out story)"] = {
        "words": mean([c["words"] for c in chance]), "all_words": mean([c["all_words"] for c in chance]),
        "dialogue_when_asked": mean([chance[i]["dialogue"] for i in asked])}
    for name in ("base", "full", "lora"):
        t0 = time.time()
        model, tok, _ = load_run(work / name)
        torch.manual_seed(0)
        replies = answers(model, tok, name, tasks, args.max_new_tokens)
        scores = [score_text(text, t) for (text, _), t in zip(replies, tasks)]
        ev = evaluate_run(work / name, data_dir=work / "heldout")
        s = stages[name]
        rows[name] = {
            "words": mean([x["words"] for x in scores]), "all_words": mean([x["all_words"] for x in scores]),
            "dialogue_when_asked": mean([scores[i]["dialogue"] for i in asked]),
            "ended": mean([float(e) for _, e in replies]),
            "reply_words": mean([len(text.split()) for text, _ in replies]),
            "story_loss": story_loss(model, tok, name, tasks),
            "heldout_eval_loss": ev["loss"], "heldout_eval_accuracy": ev["accuracy"],
            "train_time_s": s["time_s"], "steps": s["steps"], "trainable_params": trainable(work, name, model),
            "params": sum(p.numel() for p in model.parameters()), "score_s": round(time.time() - t0, 1),
        }
        examples.append({"model": name, "reply": replies[0][0][:600]})
    return {"rows": rows, "examples": {"instruction": tasks[0]["instruction"], "replies": examples},
            "prompts": len(tasks), "dialogue_asked": len(asked)}


def table(result: dict) -> list[str]:
    rows = result["rows"]
    head = ("| model | required words used | all 3 words | dialogue when asked | ends by itself | "
            "held-out story loss | slm eval: loss / accuracy | training | trainable parameters |")
    out = [head, "|---|---|---|---|---|---|---|---|---|"]
    names = {"base": "base (plain-text instruction)", "full": "full fine-tune", "lora": "LoRA fine-tune (rank 8)"}
    for key in ("base", "full", "lora"):
        r = rows[key]
        when = "pretraining " if key == "base" else "+ "
        out.append(f"| {names[key]} | {100 * r['words']:.1f}% | {100 * r['all_words']:.1f}% | "
                   f"{100 * r['dialogue_when_asked']:.0f}% | {100 * r['ended']:.0f}% | {r['story_loss']:.3f} | "
                   f"{r['heldout_eval_loss']:.3f} / {100 * r['heldout_eval_accuracy']:.1f}% | "
                   f"{when}{r['train_time_s'] / 60:.1f} min ({r['steps']:,} steps) | {r['trainable_params']:,} |")
    c = rows["chance (another held-out story)"]
    out.append(f"| chance: another held-out story | {100 * c['words']:.1f}% | {100 * c['all_words']:.1f}% | "
               f"{100 * c['dialogue_when_asked']:.0f}% | | | | | |")
    out += ["", f"{result['prompts']} prompts from held-out stories ({result['dialogue_asked']} ask for dialogue), "
            f"{result['sets']['train_records']:,} instruction records from the training stories. "
            f"Story loss: nats per story token given the instruction; slm eval: on the supervised tokens "
            f"(story and <|end|>) of the same held-out records."]
    return out


# --------------------------------------------------------------------------- smoke corpus


def smoke_corpus(directory: Path) -> tuple[Path, Path]:
    """Short deterministic stories that use words of every list, some with dialogue."""
    rng = random.Random(0)
    names = ["Tom", "Lily", "Sam", "Mia"]
    nouns, verbs, adjs = ["ball", "cat", "tree", "box", "cake", "dog"], ["found", "liked", "saw", "lost"], \
        ["red", "big", "happy", "little"]

    def story() -> str:
        n = rng.choice(names)
        text = " ".join(f"{n} {rng.choice(verbs)} a {rng.choice(adjs)} {rng.choice(nouns)}." for _ in range(rng.randint(3, 6)))
        return text + (f' "Look!" said {n}.' if rng.random() < 0.5 else "")

    directory.mkdir(parents=True, exist_ok=True)
    write_stories(directory / "train.txt", [story() for _ in range(300)])
    write_stories(directory / "valid.txt", [story() for _ in range(30)])
    return directory / "train.txt", directory / "valid.txt"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", "data", *STAGES], default="all",
                        help="run one stage (each reuses or resumes what is in --work)")
    parser.add_argument("--work", type=Path, default=WORK, help=f"working folder (default {WORK.relative_to(ROOT)})")
    parser.add_argument("--preset", default="cpu-15min")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--base-time", default="7m", help="pretraining budget of the base (default 7m)")
    parser.add_argument("--ft-time", default="3m", help="budget of each fine-tune (default 3m)")
    parser.add_argument("--full-lr", type=float, default=None, help="learning rate of the full fine-tune "
                        "(default: slm finetune's)")
    parser.add_argument("--lora-lr", type=float, default=None, help="learning rate of the LoRA fine-tune "
                        "(default: slm finetune's)")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts scored (default: all that fit)")
    parser.add_argument("--max-new-tokens", type=int, default=240)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="seconds: toy corpus, tiny model, temporary files")
    args = parser.parse_args()
    # The fine-tunes run for their time budget, not slm finetune's default 500 steps.
    args.base_overrides, args.ft_overrides = [], ["train.max_steps=100000"]
    if args.smoke:
        args.work = Path(tempfile.mkdtemp(prefix="slm-bench-finetune-"))
        args.results = args.work / "finetune.json"
        args.preset, args.context, args.prompts, args.max_new_tokens = "tiny", 128, 8, 24
        args.base_time = args.ft_time = None
        args.base_overrides = ["train.max_steps=40", "train.eval_interval=20", "train.eval_batches=2", "train.plot=false"]
        args.ft_overrides = ["train.max_steps=15", "train.eval_interval=15", "train.eval_batches=2",
                             "train.warmup_steps=2", "train.plot=false"]
    for t in (args.base_time, args.ft_time):
        if t is not None:
            parse_seconds(t)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sets = stage_data(args, args.work)
    if args.stage in ("all", "base"):
        stage_base(args, args.work)
    for name in ("full", "lora"):
        if args.stage in ("all", name):
            stage_finetune(args, args.work, name)
    if args.stage in ("all", "score"):
        result = {**machine_info(), "settings": {
            "preset": args.preset, "context": args.context, "base_time": args.base_time, "ft_time": args.ft_time,
            "max_new_tokens": args.max_new_tokens, "sampling": SAMPLE, "lora": "rank 8, alpha 16, qkv proj up down"},
            "sets": sets, "stages": read_stages(args.work)}
        result.update(stage_score(args, args.work, sets))
        result["command"] = ("python bench/finetune.py --stage base && python bench/finetune.py --stage full && "
                             "python bench/finetune.py --stage lora && python bench/finetune.py --stage score"
                             if not args.smoke else result["command"])
        result["table"] = table(result)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.results)
        print("\n".join(result["table"]))
        print(f"wrote {args.results}")
    print(f"stage {args.stage}: {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
