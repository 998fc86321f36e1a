"""Continuous batching (generate/continuous.py) and the KV cache operations under it: rows that join
a running batch and leave it give the tokens of a batch of one, sampled rows follow their own seed,
and OpenAI's extra processors do what they say."""

from __future__ import annotations

import torch
from generation_models import one_thread, random_model  # noqa: F401 - one_thread is an autouse fixture

from slmkit import cpu_kernels
from slmkit.decode import KVCache
from slmkit.generate import SamplingConfig, generate_tokens
from slmkit.generate.continuous import ContinuousBatch, Seq
from slmkit.generate.sampling import apply_ban, apply_logit_bias, apply_presence_frequency

GREEDY = SamplingConfig(temperature=0.0, stop_at_eot=False)


def run(batch: ContinuousBatch, joins: dict[int, list[Seq]]) -> None:
    """Step ``batch``, adding ``joins[i]`` before step i, until everything is done."""
    step = 0
    while step <= max(joins) or not batch.idle:
        for seq in joins.get(step, []):
            batch.add(seq)
        batch.step()
        step += 1


def test_rows_joining_and_leaving_give_the_tokens_of_a_batch_of_one(monkeypatch):
    shifts = []
    real_shift = KVCache.shift
    monkeypatch.setattr(KVCache, "shift", lambda self, n: (shifts.append(n), real_shift(self, n)))
    model = random_model(block_size=32)
    prompts = [[1, 2, 3], [5] * 9, [7, 8], list(range(10, 30)), [4], [9, 9, 9, 9, 9, 9]]
    news = [20, 12, 25, 10, 30, 17]  # long rows make the shared slots run out: the cache compacts
    solo = [generate_tokens(model, [p], SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eot=False))[0]
            for p, n in zip(prompts, news)]
    seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, news)]
    batch = ContinuousBatch(model, max_batch=3, prefill_chunk=4, ride=0)  # chunked prefill, rows wait for a slot
    run(batch, {0: seqs[:1], 3: seqs[1:3], 5: seqs[3:5], 20: seqs[5:]})
    assert [s.tokens for s in seqs] == solo
    assert all(s.finish_reason == "length" for s in seqs)
    assert batch.cache is None  # everyone left
    assert any(n > 0 for n in shifts) and any(n < 0 for n in shifts)  # rows moved right to admit, left to compact


def test_a_seeded_row_samples_as_generate_does_whatever_else_runs():
    model = random_model()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3,
                         seed=7, stop_at_eot=False)
    expected = generate_tokens(model, [[1, 2]], cfg)[0]
    alone = Seq([1, 2], cfg, 12)
    run(ContinuousBatch(model), {0: [alone]})
    crowd = Seq([1, 2], cfg, 12)
    other = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=1, stop_at_eot=False)
    run(ContinuousBatch(model), {0: [Seq([3, 4, 5], other, 12)], 2: [crowd, Seq([9], other, 6)]})
    assert alone.tokens == crowd.tokens == expected


def test_rows_with_equal_settings_sample_together_as_each_would_alone():
    model = random_model()
    cfgs = [SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=0, top_p=0.9, min_p=0.02, seed=s,
                           stop_at_eot=False) for s in range(4)]
    alone = [generate_tokens(model, [[1, 2, 3]], cfg)[0] for cfg in cfgs]
    seqs = [Seq([1, 2, 3], cfg, 10) for cfg in cfgs]
    run(ContinuousBatch(model), {0: seqs[:3], 1: seqs[3:]})
    assert [s.tokens for s in seqs] == alone
    assert len({tuple(t) for t in alone}) > 1


def test_end_tokens_min_tokens_and_cancel():
    model = random_model()
    greedy = generate_tokens(model, [[1, 2]], SamplingConfig(max_new_tokens=10, temperature=0.0, stop_at_eot=False))[0]
    end = greedy[3]
    ended = Seq([1, 2], GREEDY, 10, end_ids=(end,))
    late = Seq([1, 2], GREEDY, 10, end_ids=(greedy[0],), min_tokens=2)  # its end token is banned at first
    gone = Seq([1, 2], GREEDY, 10)
    batch = ContinuousBatch(model)
    for seq in (ended, late, gone):
        batch.add(seq)
    batch.step()
    batch.step()
    gone.cancelled = True
    run(batch, {0: []})
    first = greedy.index(end)
    assert ended.tokens == greedy[:first] and ended.finish_reason == "stop"
    assert late.tokens[0] != greedy[0] and len(late.tokens) >= 2
    assert gone.finish_reason == "cancelled" and len(gone.tokens) < 10


def test_prompt_scoring_is_the_forward_pass_log_softmax():
    model = random_model()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    seq = Seq(prompt, GREEDY, 0, logprobs=2, prompt_logprobs=True)
    run(ContinuousBatch(model, prefill_chunk=3), {0: [seq]})
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0][0].log_softmax(-1)
    want = [None] + [float(expected[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    if cpu_kernels.built() is None:  # a batch with a bf16 KV cache scores in float32 all the same
        again = Seq(prompt, GREEDY, 3, logprobs=2, prompt_logprobs=True)
        batch = ContinuousBatch(model, prefill_chunk=3, kv_dtype=torch.bfloat16)
        batch.add(again)
        while batch.cache is None:
            batch.step()
        assert batch.cache.k.dtype == torch.bfloat16  # it joined the batch rounded
        run(batch, {0: []})
        assert again.prompt_token_logprobs == seq.prompt_token_logprobs and len(again.tokens) == 3
    assert seq.prompt_token_logprobs[0] is None
    assert torch.allclose(torch.tensor(seq.prompt_token_logprobs[1:]), torch.tensor(want[1:]), atol=1e-5)
    assert [len(t) for t in seq.prompt_top_logprobs[1:]] == [2] * (len(prompt) - 1)
    assert seq.tokens == [] and seq.finish_reason == "length"
    # a scored text may be one token longer than the context: its last token is only a target
    long = list(range(model.config.block_size + 1))
    whole = Seq(long, GREEDY, 0, logprobs=0, prompt_logprobs=True)
    run(ContinuousBatch(model, prefill_chunk=7), {0: [whole]})
    with torch.no_grad():
        expected = model(torch.tensor([long[:-1]]))[0][0].log_softmax(-1)
    assert torch.allclose(torch.tensor(whole.prompt_token_logprobs[1:]), expected[range(len(long) - 1), long[1:]], atol=1e-5)


def test_kv_cache_admit_shift_and_compact_keep_each_rows_tokens():
    model = random_model()
    cfg = model.config

    def prefilled(ids: list[int]) -> tuple[KVCache, torch.Tensor]:
        cache = KVCache.empty(cfg, 1)
        with torch.no_grad():
            return cache, model(torch.tensor([ids]), last_only=True, cache=cache)[0][:, -1]

    a, _ = prefilled([1, 2, 3])
    b, _ = prefilled([4, 5, 6, 7, 8])  # longer: a's row moves right
    a.admit(b, copies=2)
    assert a.length == 5 and a.start.tolist() == [2, 0, 0] and a.padded
    with torch.no_grad():
        logits = model(torch.tensor([[9], [9], [9]]), last_only=True, cache=a)[0][:, -1]
        one = model(torch.tensor([[1, 2, 3, 9]]))[0][:, -1]
        two = model(torch.tensor([[4, 5, 6, 7, 8, 9]]))[0][:, -1]
    assert torch.allclose(logits[0], one[0], atol=1e-4) and torch.allclose(logits[1], two[0], atol=1e-4)
    a.reorder(torch.tensor([0]))
    a.compact()
    assert a.length == 4 and a.start.tolist() == [0] and not a.padded
    with torch.no_grad():
        again = model(torch.tensor([[7]]), last_only=True, cache=a)[0][:, -1]
        ref = model(torch.tensor([[1, 2, 3, 9, 7]]))[0][:, -1]
    assert torch.allclose(again, ref, atol=1e-4)


def test_rows_admitted_with_room_share_buffers_and_the_cpp_step_reads_them_in_place():
    """``admit(..., room=)``: rows that join one by one go into buffers of ``room`` rows (no copy of
    the rows already there at any join), ``reorder`` keeps them in place and moves only the rows
    that change places, and the C++ step reads such a cache as it is: the same logits, bit for
    bit, as from a contiguous copy. Only filled slots are written."""
    model = random_model()
    cfg = model.config

    def prefilled(ids: list[int]) -> KVCache:
        cache = KVCache.empty(cfg, 1)
        with torch.no_grad():
            model(torch.tensor([ids]), last_only=True, cache=cache)
        return cache

    def filled(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        return cache.k[:, :, :, : cache.length], cache.v[:, :, :, : cache.length]

    def same(a: KVCache, b: KVCache) -> bool:
        return all(map(torch.equal, filled(a), filled(b))) and torch.equal(a.start, b.start) and a.length == b.length

    rows = [[1, 2, 3], [4, 5, 6, 7, 8], [2, 2], [9, 8, 7, 6], [5]]
    batch, plain = prefilled(rows[0]), prefilled(rows[0])
    buffers = set()
    for ids in rows[1:]:
        batch.admit(prefilled(ids), room=8)
        plain.admit(prefilled(ids))
        buffers.add(batch.k.data_ptr())
    assert len(buffers) == 1, "one allocation of room rows, at the first join"
    assert batch.buffer_rows() == 8 and batch.k.size(1) == 5 and not batch.k.is_contiguous()
    assert plain.k.is_contiguous() and plain.buffer_rows() == 5 and same(batch, plain)
    assert torch.count_nonzero(plain.k[:, :, :, plain.length :]) == 0, "without room, unfilled slots stay zero"
    # closing holes (rows 1 and 3 gone): the last row moves into the first hole, nothing else moves
    before = filled(batch)[0][:, 0].clone(), filled(batch)[0][:, 2].clone()
    close = torch.tensor([0, 4, 2])
    batch.reorder(close)
    plain.reorder(close)
    assert batch.buffer_rows() == 8 and batch.k.size(1) == 3 and same(batch, plain)
    assert torch.equal(filled(batch)[0][:, 0], before[0]) and torch.equal(filled(batch)[0][:, 2], before[1])
    shuffle = torch.tensor([2, 0, 1])  # sources among the kept rows: a gathered copy
    batch.reorder(shuffle)
    plain.reorder(shuffle)
    assert batch.buffer_rows() == 8 and same(batch, plain)
    if cpu_kernels.built() is not None:
        return  # no C++ library here: the rest is its step
    from slmkit.decode import NativeDecoder
    step = NativeDecoder(model)
    ids = torch.tensor([3, 1, 4])
    with torch.no_grad():
        got = step.step(ids, batch)
        want = step.step(ids, plain)
    assert batch.buffer_rows() == 8, "the step read the buffers in place (no contiguous copy)"
    assert torch.equal(got, want) and same(batch, plain)


def test_a_batch_that_empties_keeps_its_buffers_for_the_next_rows():
    """Rows that join a batch after it emptied land in the buffers of room rows the last ones used
    (allocated anew, their pages would fault again as the step reached them), and what those
    buffers still hold changes no token: each row's greedy tokens are its solo ones."""
    model = random_model(block_size=48)
    batch = ContinuousBatch(model, max_batch=4, ride=0)
    if not batch.decoder.strided_kv:
        import pytest

        pytest.skip(f"the {batch.decoder.name!r} decoder reads no buffers with room")
    buffers = []
    step = batch.decoder.step
    batch.decoder.step = lambda ids, cache, need=None, **kw: buffers.append(cache.k.data_ptr()) or step(ids, cache, need, **kw)
    waves = [([[1, 2, 3], [4, 5]], [6, 9]), ([[7, 8, 9, 1], [2, 6], [5]], [8, 5, 7])]
    for n, (prompts, news) in enumerate(waves):
        solo = [generate_tokens(model, [p], SamplingConfig(max_new_tokens=k, temperature=0.0, stop_at_eot=False))[0]
                for p, k in zip(prompts, news)]
        seqs = [Seq(p, GREEDY, k) for p, k in zip(prompts, news)]
        if n:
            assert batch.cache is None and batch._spare is not None
            with torch.inference_mode():
                for t in batch._spare:
                    t.fill_(float("nan"))  # whatever was left there must not reach a row
        first = len(buffers)
        run(batch, {0: seqs[:1], 1: seqs[1:]})  # the second row joins the first's cache: room buffers
        assert [s.tokens for s in seqs] == solo
        wave = set(buffers[first + 1 :])  # after the first step (the first row's own cache)
        assert len(wave) == 1
        if n:
            assert wave == kept, "the second wave's rows are in the first wave's buffers"
        kept = wave
        spare = batch._spare
        run(batch, {0: [Seq([3, 1], GREEDY, 4)]})  # a lone row, in a cache of its own: the buffers stay kept
        assert batch._spare is spare is not None


def test_openai_processors():
    logits = torch.zeros(2, 5)
    biased = apply_logit_bias(logits, torch.tensor([1, 3]), torch.tensor([2.0, -100.0]))
    assert biased[:, 1].tolist() == [2.0, 2.0] and biased[:, 3].tolist() == [-100.0, -100.0] and biased[0, 0] == 0
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0]] * 2)
    penalised = apply_presence_frequency(logits, counts, 0.5, 0.25)
    assert penalised[0].tolist() == [0.0, -1.0, -0.75, 0.0, 0.0]
    assert apply_ban(logits, torch.tensor([4]))[:, 4].tolist() == [float("-inf")] * 2


def test_a_row_that_leaves_is_a_hole_the_next_sequence_takes_or_that_closes_up():
    """A row whose sequence ends stays as a hole for the next sequence. A decoder that runs every
    row ("step") closes holes that waited ``hole_steps`` steps (the last rows move into them); the
    C++ step skips holes (they cost it nothing), so it keeps them and only drops those after the
    last running row, which moves no row."""
    model = random_model(block_size=48)
    prompts, news = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [3, 24, 6]
    solo = [generate_tokens(model, [p], SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eot=False))[0]
            for p, n in zip(prompts, news)]
    for path in ("fast", "step"):
        for hole_steps, joins in ((8, {0: [0, 1], 5: [2]}), (2, {0: [0, 1], 9: [2]}), (8, {0: [1], 1: [0]})):
            seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, news)]
            batch = ContinuousBatch(model, hole_steps=hole_steps, path=path)
            skips = batch.decoder.skips_rows
            skipped = []  # rows per step the decoder was told not to run (the C++ step skips holes)
            step_of = batch.decoder.step
            batch.decoder.step = lambda ids, cache, need=None, holes=None, **kw: skipped.append(
                0 if holes is None else int(holes.sum())) or step_of(ids, cache, need, **kw, **({} if holes is None else {"holes": holes}))
            rows = []  # cache rows after each step
            step = 0
            while step <= max(joins) or not batch.idle:
                for i in joins.get(step, []):
                    batch.add(seqs[i])
                batch.step()
                rows.append(0 if batch.cache is None else batch.cache.k.size(1))
                step += 1
            ran = [s for s in seqs if s.tokens]
            assert [s.tokens for s in ran] == [t for s, t in zip(seqs, solo) if s.tokens]
            if 2 not in joins.get(5, []) + joins.get(9, []):  # the first sequence ends in the last row
                if skips:  # its row, the last one, goes at the end of the step it was skipped in
                    assert sum(skipped) == 1 and rows[skipped.index(1) + 1] == 1
                else:  # it waits hole_steps steps for a sequence, then closes
                    assert rows[7:15] == [2] * 8 and rows[15] == 1
                continue
            assert max(skipped) == (1 if skips else 0)
            if hole_steps == 8:  # the third sequence takes the first one's row: the cache never grows past two
                assert max(rows) == 2 and rows[6] == 2 and batch.running == 0
            elif skips:  # the hole waited for the third sequence
                assert rows[4:11] == [2] * 7
            else:  # the hole waited two steps and closed up; the third sequence then joined as a new row
                assert 1 in rows[4:9] and rows[10] == 2


def test_prompts_of_one_length_are_prefilled_together_and_give_their_solo_tokens(monkeypatch):
    """Waiting prompts of the same length go through one forward pass (all of them while no row
    runs, at most ``prefill_chunk`` tokens' worth while rows run); each row's tokens stay its solo ones."""
    model = random_model(block_size=40)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [3, 1, 4, 1, 5], [2, 7, 1], [6, 6, 6], [5, 4, 3]]
    news = [6, 9, 4, 7, 8, 5, 6]
    solo = [generate_tokens(model, [p], SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eot=False))[0]
            for p, n in zip(prompts, news)]
    batch = ContinuousBatch(model, max_batch=8, prefill_chunk=6, ride=0)
    passes = []
    real = batch.decoder.prefill
    monkeypatch.setattr(batch.decoder, "prefill", lambda ids, cache: (passes.append(tuple(ids.shape)), real(ids, cache))[1])
    seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, news)]
    run(batch, {0: seqs[:4], 2: seqs[4:]})
    assert [s.tokens for s in seqs] == solo
    # step 0: nothing runs, the three 3-token prompts in one pass (then the 5-token one is over budget);
    # later, with rows running, 6 tokens a step: the 5-token prompt alone, then two 3-token prompts, then one
    assert passes == [(3, 3), (1, 5), (2, 3), (1, 3)]


def test_nucleus_rows_draw_in_one_native_call_as_each_would_alone(monkeypatch):
    import slmkit.generate.continuous as C

    calls = []
    native = C.native_top_p
    monkeypatch.setattr(C, "native_top_p", lambda *a: calls.append((len(a[3]), a[5])) or native(*a))
    model = random_model()
    cfgs = [SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=0, top_p=0.9, seed=s, stop_at_eot=False)
            for s in range(4)]
    alone = [generate_tokens(model, [[1, 2, 3]], cfg)[0] for cfg in cfgs]  # slm generate, one prompt at a time
    assert len({tuple(t) for t in alone}) > 1
    for threads in (None, 1):  # the server samples on one thread: the same tokens
        calls.clear()
        seqs = [Seq([1, 2, 3], cfg, 10) for cfg in cfgs]
        run(ContinuousBatch(model, sample_threads=threads), {0: seqs[:3], 1: seqs[3:]})
        assert [s.tokens for s in seqs] == alone
        if C.native_sampling(torch.device("cpu")):
            assert max(n for n, _ in calls) == 4 and {t for _, t in calls} == {threads}  # one call for a step's 4 rows


def test_short_prompts_ride_the_running_batch_and_keep_their_solo_greedy_tokens():
    model = random_model(block_size=32)
    prompts = [[1, 2, 3], [5] * 9, [7, 8], list(range(10, 30)), [4], [9, 9, 9, 9, 9, 9]]
    news = [20, 12, 25, 10, 30, 17]  # the shared slots run out: the cache compacts with riders in it
    solo = [generate_tokens(model, [p], SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eot=False))[0]
            for p, n in zip(prompts, news)]
    for ride_idle in (0, 3):  # 3: the first prompt (3 tokens) rides the idle batch's steps too
        seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, news)]
        # the 20-token prompt is prefilled
        batch = ContinuousBatch(model, max_batch=3, prefill_chunk=4, ride=9, ride_idle=ride_idle)
        prefilled, fed = [], []
        prefill = batch.decoder.prefill
        batch.decoder.prefill = lambda ids, cache: prefilled.append(ids.size(1)) or prefill(ids, cache)
        step = batch.decoder.step
        skipped = []  # rows per step whose logits the step was told nobody reads
        batch.decoder.step = lambda ids, cache, need=None, **kw: fed.append(ids.size(0)) or skipped.append(
            0 if need is None else int((~need).sum())) or step(ids, cache, need, **kw)
        run(batch, {0: seqs[:1], 2: seqs[1:3], 6: seqs[3:]})
        assert [s.tokens for s in seqs] == solo
        # the first prompt alone (unless it rode), the long one in chunks: the rest rode
        assert prefilled == ([4, 4, 4, 4, 4] if ride_idle else [3, 4, 4, 4, 4, 4])
        assert max(fed) == 3 and batch.cache is None
        # a rider's row gets no logits before its last prompt token (the C++ step skips its head)
        riding = 8 + 1 + 5 + 2 * bool(ride_idle)  # the tokens before the last of the riding prompts
        assert sum(skipped) >= riding if batch.decoder.skips_logits else not any(skipped)


def test_a_decoder_that_feeds_many_takes_a_riding_prompt_in_one_step():
    """With the C++ step (``feeds_many``) a riding prompt's tokens go in its first step, as many as
    fit before the batch's next slot (all of them into an idle batch), the rest one a step; with a
    cached prefix too; every row keeps its solo greedy tokens."""
    from slmkit.generate.prefix import PrefixCache

    model = random_model(block_size=48)
    batch = ContinuousBatch(model, max_batch=4, ride=16, ride_idle=16, kv_dtype=torch.bfloat16)
    if not batch.decoder.feeds_many:
        import pytest

        pytest.skip(f"{batch.decoder.name} feeds one token a row a step")
    prompts = [list(range(1, 11)), [5, 6, 7], list(range(20, 36)), list(range(1, 9)) + [40, 41, 42]]
    news = [20, 15, 6, 5]
    bf16 = torch.bfloat16

    def solo(p: list[int], n: int) -> list[int]:
        b = ContinuousBatch(model, ride=0, kv_dtype=bf16)  # prefilled, one row: the tokens to match
        seq = Seq(p, GREEDY, n)
        run(b, {0: [seq]})
        return seq.tokens

    want = [solo(p, n) for p, n in zip(prompts, news)]
    for prefixes in (None, PrefixCache(64 << 20)):
        batch = ContinuousBatch(model, max_batch=4, ride=16, ride_idle=16, kv_dtype=bf16, prefixes=prefixes)
        fed = []  # per step: {row: extra tokens}
        step = batch.decoder.step
        batch.decoder.step = lambda ids, cache, need=None, **kw: fed.append(
            {i: len(t) for i, t in kw.get("extra", {}).items()}) or step(ids, cache, need, **kw)
        seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, news)]
        # the first alone into an idle batch; the second when 10 slots are filled (room for its 2
        # extras); the third (16 tokens) when 12 are (room for 12 of its 15 extras: 3 more ride one
        # a step); the last shares the first's 8-token prefix, cached once the first is fed
        run(batch, {0: seqs[:1], 1: seqs[1:2], 3: seqs[2:3], 4: seqs[3:]})
        assert [s.tokens for s in seqs] == want
        assert fed[0] == {0: 9}  # the whole first prompt in one step, its last token the row's own
        assert fed[1] == {1: 2} and fed[2] == {} and fed[3] == {2: 12}
        assert fed[4] == ({3: 2} if prefixes is not None else {3: 10})
    # into a running batch at most prefill_chunk (3) extra tokens a step: the second of two prompts
    # joining together waits a step rather than ride its tokens one a step
    batch = ContinuousBatch(model, max_batch=4, prefill_chunk=3, ride=16, ride_idle=16, kv_dtype=bf16)
    fed = []
    step = batch.decoder.step
    batch.decoder.step = lambda ids, cache, need=None, **kw: fed.append(
        {i: len(t) for i, t in kw.get("extra", {}).items()}) or step(ids, cache, need, **kw)
    seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts[:2] + [[9, 8, 7]], news)]
    run(batch, {0: seqs[:1], 2: seqs[1:]})
    assert [s.tokens for s in seqs] == want[:2] + [solo([9, 8, 7], news[2])]
    assert fed[:4] == [{0: 9}, {}, {1: 2}, {2: 2}]
    # one budget a step, however many times riders join in it: riders before and after a prefill
    # (the 7-token prompt, past ride) share the step's prefill_chunk (8)
    batch = ContinuousBatch(model, max_batch=4, prefill_chunk=8, ride=6, kv_dtype=bf16)
    fed = []
    step = batch.decoder.step
    batch.decoder.step = lambda ids, cache, need=None, **kw: fed.append(
        {i: len(t) for i, t in kw.get("extra", {}).items()}) or step(ids, cache, need, **kw)
    prompts = [list(range(1, 9)), [3, 4, 5, 6, 7, 8], list(range(20, 27)), [9, 8, 7, 6, 5, 4]]
    seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, [30, 5, 5, 5])]
    run(batch, {0: seqs[:1], 8: seqs[1:]})
    assert [s.tokens for s in seqs] == [solo(p, s.max_new_tokens) for p, s in zip(prompts, seqs)]
    assert max(sum(f.values()) for f in fed[1:]) <= 8 and {1: 5} in fed  # (the first: an idle batch's)


def test_a_bf16_kv_cache_gives_each_row_its_tokens_of_a_batch_of_one():
    """With a bf16 KV cache (the C++ step's option) the rows that join (prefilled in chunks or
    riding the decode steps), leave, compact and fill holes get the greedy tokens each gets run
    alone over a bf16 cache: the cache operations copy the rounded keys and values as they are."""
    if cpu_kernels.built() is not None:
        import pytest

        pytest.skip(f"no C++ library: {cpu_kernels.built()}")
    model = random_model(block_size=32)
    prompts = [[1, 2, 3], [5] * 9, [7, 8], list(range(10, 30)), [4], [9, 9, 9, 9, 9, 9]]
    news = [20, 12, 25, 10, 30, 17]
    bf16 = torch.bfloat16

    def solo(p: list[int], n: int) -> list[int]:
        seq = Seq(p, GREEDY, n)
        run(ContinuousBatch(model, kv_dtype=bf16), {0: [seq]})
        return seq.tokens

    alone = [solo(p, n) for p, n in zip(prompts, news)]
    for ride in (0, 4):
        seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, news)]
        batch = ContinuousBatch(model, max_batch=3, prefill_chunk=4, ride=ride, kv_dtype=bf16)
        seen = []
        step = batch.decoder.step
        batch.decoder.step = lambda ids, cache, need=None, **kw: (seen.append(cache.k.dtype), step(ids, cache, need, **kw))[1]
        run(batch, {0: seqs[:1], 3: seqs[1:3], 5: seqs[3:5], 20: seqs[5:]})
        assert [s.tokens for s in seqs] == alone
        assert seen and set(seen) == {bf16}


def test_prefix_cache_hits_keep_each_rows_solo_greedy_tokens(monkeypatch):
    """Prompts that share openings start from the cached keys and values of earlier prompts, riding
    (into holes, appended, across a compaction) or prefilled (in chunks, or together in one pass with
    prefixes of different lengths), and still get their solo greedy tokens, the same as without a cache."""
    from slmkit.generate.prefix import PrefixCache

    model = random_model(block_size=32)
    base = [3, 1, 4, 1, 5, 9, 2, 6]
    prompts = [base, base + [5, 3], base[:5] + [8, 9, 7], [2, 7], base + [5, 3, 5, 8, 9, 7, 9, 3, 2, 3],
               base[:3] + [11, 12, 13, 14, 15], base + [5, 3, 5], [20, 21, 22]]
    news = [14, 6, 9, 20, 5, 8, 7, 6]
    solo = [generate_tokens(model, [p], SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eot=False))[0]
            for p, n in zip(prompts, news)]
    joins = {0: [0], 2: [1, 2, 3], 9: [4], 12: [5], 26: [6], 40: [7]}
    for ride, chunk in ((16, 4), (0, 4), (0, 32)):  # riding; chunked prefill; prefill together
        store = PrefixCache(1 << 20)
        seqs = [Seq(p, GREEDY, n) for p, n in zip(prompts, news)]
        batch = ContinuousBatch(model, max_batch=3, prefill_chunk=chunk, ride=ride, hole_steps=3, prefixes=store)
        run(batch, {step: [seqs[i] for i in ids] for step, ids in joins.items()})
        assert [s.tokens for s in seqs] == solo, (ride, chunk)
        assert store.hit_tokens >= 5 + 8 + 8, (ride, chunk)  # at least prompts 2, 5 and 7 found theirs
        assert store.query_tokens == sum(map(len, prompts))
        scored = Seq(base + [5, 3], GREEDY, 0)  # nothing to generate: runs whole (its prefix is cached)
        run(batch, {0: [scored]})
        assert scored.finish_reason == "length" and scored.tokens == [] and store.query_tokens == sum(map(len, prompts))


def test_waiting_prompts_with_cached_prefixes_of_different_lengths_are_prefilled_together(monkeypatch):
    """Prompts that arrive together go through one pass whatever their cached prefixes: each runs
    the most any of them has uncached, its other tokens from the cache."""
    from slmkit.generate.prefix import PrefixCache

    model = random_model(block_size=32)
    base = [3, 1, 4, 1, 5, 9, 2, 6]
    prompts = [base[:6] + [7, 8, 9], base + [10, 11, 12], [13, 14, 15, 16, 17]]  # cached 6, 8 and 0 tokens
    solo = [generate_tokens(model, [p], SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eot=False))[0]
            for p in prompts]
    store = PrefixCache(1 << 20)
    batch = ContinuousBatch(model, prefixes=store)
    run(batch, {0: [Seq(base, GREEDY, 2)]})
    passes = []
    real = batch.decoder.prefill
    monkeypatch.setattr(batch.decoder, "prefill", lambda ids, cache: (passes.append(tuple(ids.shape)), real(ids, cache))[1])
    seqs = [Seq(p, GREEDY, 6) for p in prompts]
    hits = store.hit_tokens
    run(batch, {0: seqs})
    assert passes == [(3, 5)] and [s.tokens for s in seqs] == solo
    assert store.hit_tokens - hits == (9 - 5) + (11 - 5)  # the last five tokens of each ran


def test_a_prompt_cancelled_before_its_end_is_not_cached():
    from slmkit.generate.prefix import PrefixCache

    model = random_model(block_size=40)
    for ride, chunk in ((16, 4), (0, 4)):  # riding the decode steps; prefilled in chunks
        store = PrefixCache(1 << 20)
        batch = ContinuousBatch(model, prefill_chunk=chunk, ride=ride, prefixes=store)
        batch.add(Seq([1, 2], GREEDY, 30))
        batch.step()
        held = store.nbytes
        gone = Seq(list(range(10, 22)), GREEDY, 5)
        batch.add(gone)
        batch.step()
        batch.step()
        gone.cancelled = True
        run(batch, {0: []})
        assert gone.finish_reason == "cancelled" and store.nbytes == held and store.match(gone.prompt) == 0
