"""What the workloads feed the model: a fixed, deterministic prompt set of mixed lengths (a few words .. ~200
tokens, about 1/6 Japanese), and the per-row settings of the realistic workload (sampled, answer lengths drawn
with a fixed seed, one seed per row)."""

from __future__ import annotations

import random

SHORT_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Translate to French: good morning",
    "The best way to learn a language is",
    "Q: What is 12 times 7?\nA:",
    "List three primary colors:",
    "In 1969, humans first",
    "日本の首都は",
    "今日の天気は",
    "Write a haiku about autumn.",
    "import numpy as np\n",
    "The mitochondria is",
    "Dear hiring manager,",
    "富士山の高さは",
    "A recipe for pancakes:",
]

EN_SENTENCES = [
    "The history of the printing press shows how a single invention can reshape the way knowledge spreads.",
    "Before Gutenberg, books were copied by hand, which made them rare, expensive and often inconsistent.",
    "Modern compilers translate high-level source code into machine instructions through several passes.",
    "Each pass transforms an intermediate representation, removing redundancy and exposing parallelism.",
    "Photosynthesis converts light energy into chemical energy stored in the bonds of glucose molecules.",
    "The chloroplast contains stacks of thylakoid membranes where the light-dependent reactions take place.",
    "A good unit test checks one behaviour, runs quickly and fails with a message that explains the problem.",
    "When the test suite is slow, developers run it less often, and regressions slip into the main branch.",
    "The river delta supports a dense population of birds that migrate thousands of kilometres every year.",
    "Farmers along the banks rely on seasonal floods to deposit fertile silt across their fields.",
    "In distributed systems, a network partition forces a choice between consistency and availability.",
    "Leases and heartbeats let a cluster detect failed workers and hand their work to someone else.",
    "The orchestra tuned their instruments while the audience slowly found their seats in the dim hall.",
    "A single oboe sounded the A, and the strings answered it one section at a time.",
    "Interest rates influence how much households borrow and how much companies invest in new factories.",
    "Central banks raise rates to cool inflation, accepting slower growth as the price of stable prices.",
    "The lighthouse keeper wrote in his logbook every evening, noting the wind, the tide and passing ships.",
    "On stormy nights he climbed the spiral stairs twice an hour to trim the wick and clean the lens.",
    "Transformer language models predict the next token from all previous tokens using self-attention.",
    "Caching the keys and values of earlier tokens makes each decoding step cost far less than the first.",
    "The expedition reached the glacier after nine days of walking through forests and over high passes.",
    "Their guide warned them that the ice bridge would not hold after the afternoon sun had softened it.",
    "Good documentation answers the question a reader has right now, not every question they might ask.",
    "Examples that can be copied and run teach faster than paragraphs of careful explanation.",
]

JA_SENTENCES = [
    "日本は四つの大きな島と数千の小さな島からなる国です。",
    "春になると、多くの人が公園で桜の花を見ながら食事を楽しみます。",
    "東京の地下鉄は時間に正確で、毎日何百万人もの人が利用しています。",
    "機械学習のモデルは大量のデータから規則を学び、新しい入力に対して予測を行います。",
    "京都には千年以上の歴史を持つ寺や神社がたくさんあります。",
    "秋の山は赤や黄色の葉で覆われ、ハイキングをする人でにぎわいます。",
    "この文章は、多言語の入力を扱う性能評価のために用意されたものです。",
    "新しい駅の建設は予定より二年遅れましたが、ついに来月開業します。",
]


def build_prompts(n: int, count_tokens) -> list[str]:
    """`n` prompts, deterministic for a given n and tokenizer. Kinds cycle: short (3/8), medium ~25-80 tokens
    (2/8), long ~110-190 tokens (2/8), Japanese medium/long (1/8); short ones include Japanese too."""
    rng = random.Random(1234)
    prompts: list[str] = []
    for i in range(n):
        kind = i % 8
        if kind in (0, 1, 2):
            prompts.append(SHORT_PROMPTS[(i // 8 * 3 + kind) % len(SHORT_PROMPTS)])
            continue
        if kind == 7:
            pool, target, sep = JA_SENTENCES, rng.randint(40, 190), ""
        else:
            pool, sep = EN_SENTENCES, " "
            target = rng.randint(25, 80) if kind in (3, 4) else rng.randint(110, 190)
        start = rng.randrange(len(pool))
        parts: list[str] = []
        j = 0
        while not parts or count_tokens(sep.join(parts)) < target:
            parts.append(pool[(start + j) % len(pool)])
            j += 1
        text = sep.join(parts)
        ask = [
            "Summarize the text above in one sentence:",
            "Continue the text:",
            "Question: what is the main idea?\nAnswer:",
        ]
        if kind == 7:
            text += "\n要約:"
        else:
            text += "\n\n" + ask[i % 3]
        prompts.append(text)
    rng.shuffle(prompts)  # file order mixes lengths, as a real input file does
    return prompts


# A few-shot instruction put before every prompt (refill.py --few-shot), as users of a base model write them: the
# task, then worked examples, then the text at hand. Every prompt of such a job starts with the same ~200 tokens.
FEW_SHOT = (
    "You read a short text and answer what it asks, in one or two plain sentences. Examples:\n\n"
    "Text: The library will close at noon on Friday for staff training and reopen on Saturday morning.\n"
    "Question: what is the main idea?\nAnswer: The library closes early on Friday for training.\n\n"
    "Text: Heavy rain flooded two roads near the river, and the city asked drivers to take the bridge instead.\n"
    "Summarize the text above in one sentence: Flooding closed roads, so drivers should use the bridge.\n\n"
    "Text: 新しい図書館は駅の近くにあり、毎日夜九時まで開いています。\n要約: 駅の近くの新しい図書館は夜九時まで開いている。\n\n"
    "Text: The team tested three batteries and found that the smallest one lasted the longest in cold weather.\n"
    "Continue the text: They plan to use it in the winter field trials next year.\n\n"
    "Now the text at hand.\n\nText: "
)

# The realistic workload samples as a chat product would, and lets EOS end a row (no min_new_tokens).
TEMPERATURE, TOP_P = 0.8, 0.95
SAMPLING = {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0}  # for model.generate
ANSWER_LENGTHS = (8, 16, 32, 64, 128)  # max_new_tokens a row may get (up to the cap)


def answer_lengths(n: int, cap: int, seed: int = 4321) -> list[int]:
    """max_new_tokens per row: drawn with a fixed seed from ANSWER_LENGTHS up to CAP (and CAP itself), so rows
    finish at very different steps; few distinct values, so a pipeline script runs each as one call."""
    choices = sorted({v for v in ANSWER_LENGTHS if v < cap} | {cap})
    rng = random.Random(seed)
    return [rng.choice(choices) for _ in range(n)]


def row_seeds(n: int) -> list[int]:
    """One sampling seed per row, the same for every method."""
    return [1000 + i for i in range(n)]


def realistic_rows(texts: list[str], lengths: list[int], seeds: list[int]) -> list[dict]:
    """The realistic prompts as a runner input file: each row with its own max_tokens and seed."""
    return [{"id": f"p{i:05d}", "prompt": t, "max_tokens": n, "seed": s}
            for i, (t, n, s) in enumerate(zip(texts, lengths, seeds, strict=True))]  # fmt: skip
