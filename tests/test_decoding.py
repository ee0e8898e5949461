"""The bounded half-precision logits (float32 product + error bounds, CPU) pick exactly the
tokens the half-precision product picks, ties and near-ties included."""

from __future__ import annotations

import copy

import torch

from ichigo_pipeline import decoding


def _exact_next(decoder, hidden, tokens):
    logits = (hidden @ decoder.logit_weight.T).float()
    decoder._apply_rules(logits, tokens)
    return logits.argmax(dim=-1)


def _token_states(decoder, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Token histories in the states the rules treat differently: first step, text only,
    after one timestamp, after a timestamp pair."""
    initial = torch.tensor([decoder.initial] * batch)
    ts = decoder.tokenizer.timestamp_begin
    text = torch.randint(0, decoder.tokenizer.eot, (batch, 3), generator=gen)
    stamp = ts + torch.randint(0, 50, (batch, 1), generator=gen)
    return [
        initial,
        torch.cat([initial, stamp, text], dim=1),
        torch.cat([initial, stamp, text, stamp + 5], dim=1),
        torch.cat([initial, stamp, text, stamp + 5, stamp + 5], dim=1),
    ]


def test_half_product_lies_within_the_bounds(tiny_en_model):
    """The claim the bounded path rests on: every logit of PyTorch's half product on CPU is
    between half(s - delta) and half(s + delta); and the bounds are needed (half(s) alone
    differs from the half product somewhere)."""
    decoder = tiny_en_model.decoder
    width = decoder.logit_weight.shape[1]
    gen = torch.Generator().manual_seed(2)
    differs = 0
    for scale in (1.0, 10.0, 60.0):
        hidden = (torch.randn(32, width, generator=gen) * scale).half()
        half = (hidden @ decoder.logit_weight.T).float()
        s, coef = decoder._wide_logits(hidden)
        delta = decoder._logit_delta(coef[:, None], decoder._logit_norms[None, :], s)
        lo, hi = (s - delta).half().float(), (s + delta).half().float()
        assert bool(((lo <= half) & (half <= hi)).all()), scale
        differs += int((s.half().float() != half).sum())
    assert differs > 0


def test_bounded_logits_pick_the_half_precision_tokens(tiny_en_model):
    decoder = tiny_en_model.decoder
    assert decoder.dtype == torch.float16 and decoder._logit_weight32 is not None
    width = decoder.logit_weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    rows = 0
    before = decoder.bounded_fallbacks
    for scale in (0.5, 2.0, 8.0, 30.0):
        for tokens in _token_states(decoder, 48, gen):
            hidden = (torch.randn(48, width, generator=gen) * scale).half()
            assert decoder._bounded_logits_pay(hidden)
            fast = decoder._next_tokens_bounded(hidden, tokens.clone())
            exact = _exact_next(decoder, hidden, tokens.clone())
            assert torch.equal(fast, exact), (scale, tokens.shape)
            rows += len(hidden)
    fallbacks = decoder.bounded_fallbacks - before
    # the bounds decide most rows themselves (otherwise the path is pointless)
    assert fallbacks < rows // 4, (fallbacks, rows)


def test_exact_ties_fall_back_to_the_half_product(tiny_en_model):
    """Rows whose best logit is tied (two identical weight rows): the half product picks the
    lower index; the bounds cannot separate them and must leave the row to it."""
    decoder = copy.copy(tiny_en_model.decoder)
    weight = decoder.logit_weight.clone()
    pairs = [(11, 400), (250, 1200), (3000, 3001), (5000, 20000)]
    for low, high in pairs:
        weight[high] = weight[low]
    decoder.logit_weight = weight
    decoder._logit_weight32 = weight.float()
    decoder._logit_norms = decoder._logit_weight32.double().norm(dim=-1).float()
    decoder._max_text_norm = decoder._logit_norms[: decoder.tokenizer.timestamp_begin].max()
    decoder.bounded_fallbacks = 0
    gen = torch.Generator().manual_seed(1)
    tokens = _token_states(decoder, len(pairs), gen)[1]  # text allowed, no forced timestamp
    hidden = torch.stack([weight[low].float() * 40.0 for low, _ in pairs]).half()
    exact = _exact_next(decoder, hidden, tokens.clone())
    assert exact.tolist() == [low for low, _ in pairs]  # the tie goes to the lower index
    fast = decoder._next_tokens_bounded(hidden, tokens.clone())
    assert torch.equal(fast, exact)
    assert decoder.bounded_fallbacks == len(pairs)


def test_small_batches_use_the_half_product(tiny_en_model):
    decoder = tiny_en_model.decoder
    hidden = torch.zeros(decoding.BOUNDED_LOGITS_MIN_ROWS - 1, decoder.logit_weight.shape[1])
    assert not decoder._bounded_logits_pay(hidden.half())
    assert not decoder._bounded_logits_pay(torch.zeros(64, hidden.shape[1]))  # float32


def test_ended_segment_at_reads_a_final_timestamp_pair(tiny_en_model):
    decoder = tiny_en_model.decoder
    ts = decoder.tokenizer.timestamp_begin
    assert decoder.ended_segment_at([ts, 300, 301, ts + 250, ts + 250]) == 250 * 0.02
    assert decoder.ended_segment_at([ts, 300, 301, ts + 250]) is None  # a single timestamp
    assert decoder.ended_segment_at([300, 301]) is None
    assert decoder.ended_segment_at([]) is None


def test_ichigo_chunks_are_never_resumed(tiny_en_model):
    """Resuming after the last segment is plain Whisper's (openai-whisper's seek); an Ichigo
    model's text stays what upstream decodes from each chunk's sound tokens."""
    from ichigo_pipeline.pipeline import BatchPipeline

    ts = tiny_en_model.decoder.tokenizer.timestamp_begin
    pipeline = BatchPipeline(tiny_en_model)
    assert pipeline._resume_at([ts, 300, ts + 250, ts + 250], duration_s=20.0) is None
