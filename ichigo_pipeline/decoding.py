"""Batched greedy decoding with openai-whisper's decoding rules, on a transformers decoder.

The rules reproduced (openai-whisper ``DecodingOptions`` defaults as upstream Ichigo uses them):
optional ``<|startofprev|>`` prompt (last 223 tokens of ``" " + prompt``), start sequence,
per-item language detection when no language is set on a multilingual model, blank
suppression at the first step, ``"-1"`` token suppression (non-speech symbols and task
tokens), timestamp rules (pairs, monotonic, first token a timestamp <= 1 s, timestamps win
when their total probability beats any text token), greedy argmax, at most 224 new tokens.
Timestamp tokens are dropped from the text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .quantizer import FP32LayerNorm
from .tokenizer import WhisperTokenizer

N_AUDIO_CTX_SECONDS = 30.0


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"
    language: str | None = None
    prompt: str | None = None
    sample_len: int = 224
    suppress_blank: bool = True
    suppress_tokens: str = "-1"
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0

    @classmethod
    def from_upstream(cls, section: dict | None) -> DecodingOptions:
        section = dict(section or {})
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unsupported decoding options: {sorted(unknown)}")
        return cls(**section)


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]  # sampled tokens, timestamps included, up to (not including) EOT
    text: str
    language: str | None


ATTENTION = "ichigo_whisper_sdpa"
# half-precision logits on CPU are taken from a float32 product with error bounds from this
# many rows on (below it the half product is cheaper); see _next_tokens_bounded
BOUNDED_LOGITS_MIN_ROWS = 6
TIMESTAMP_RULE_MARGIN = 1e-3


def _whisper_strides(x: torch.Tensor) -> torch.Tensor:
    """openai-whisper's layout: [B, T, H, d] memory viewed as [B, H, T, d] (no copy if it
    already is)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _sdpa(query, key, value, mask, is_causal):
    key, value = _whisper_strides(key), _whisper_strides(value)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal
    )


def _half_on_cpu(query: torch.Tensor) -> bool:
    """Whether the upstream-exact attention is needed: only half precision on CPU rounds
    differently with whisper's strides or with the batch split across threads."""
    return query.device.type == "cpu" and query.dtype in (torch.float16, torch.bfloat16)


def _whisper_layout_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """SDPA called exactly as openai-whisper calls it, one batch item at a time on CPU.

    The query arrives unscaled (see ``use_whisper_attention``) and is scaled inside the kernel;
    keys and values get whisper's strides. PyTorch's CPU attention kernel splits its work by
    batch and head across threads, and in half precision a row's result then depends on its
    place in the batch; upstream runs one chunk at a time, so on CPU each item runs alone (the
    large matrix products around it stay batched). Otherwise float16 decoding would drift
    from upstream's by one ulp and flip rare ties. Float32 and GPU calls skip all of this:
    the per-item split and stride copies cost about a third of a float32 CPU run.
    """
    is_causal = attention_mask is None and query.shape[2] > 1 and module.is_causal
    batch = query.shape[0]
    if not _half_on_cpu(query):
        # float32 on CPU, or any GPU call (batched there before too): the batched kernel
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=is_causal
        )
    elif batch == 1:
        out = _sdpa(query, key, value, attention_mask, is_causal)
    else:
        per_item_mask = attention_mask is not None and attention_mask.shape[0] == batch
        out = torch.cat(
            [
                _sdpa(
                    query[i : i + 1],
                    key[i : i + 1],
                    value[i : i + 1],
                    attention_mask[i : i + 1] if per_item_mask else attention_mask,
                    is_causal,
                )
                for i in range(batch)
            ]
        )
    return out.transpose(1, 2).contiguous(), None


def use_whisper_attention(model) -> None:
    """Switch a transformers Whisper to openai-whisper's attention arithmetic.

    transformers multiplies the query by 1/sqrt(d) before attention; in float16 that pushes
    small values into subnormals and loses bits. Here the query stays unscaled and the kernel
    scales it, as openai-whisper does.
    """
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "q_proj"):
            module.scaling = 1.0
    model.set_attn_implementation(ATTENTION)


AttentionInterface.register(ATTENTION, _whisper_layout_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _to_dtype_keeping_fp32_layer_norms(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module`` to ``dtype`` except its LayerNorms, which keep float32 weights and compute
    in float32 on a float32 copy of their input before casting back (openai-whisper's
    LayerNorm). Weights never round-trip through ``dtype``."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            sub.__class__ = FP32LayerNorm
            continue
        for p in sub.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point():
                sub._buffers[name] = buf.to(dtype)


class BatchDecoder:
    """Greedy decoding of a batch of audio features [B, 1500, width] in one loop.

    Runs the transformers decoder in ``dtype`` the way openai-whisper does: token and position
    embeddings summed in float32 then cast, layer norms in float32, linear layers and
    attention in ``dtype``, logits against the token embedding cast to ``dtype``, decoding
    rules in float32. Upstream Ichigo decodes in float16 (its DecodingOptions default), on CPU
    as well.
    """

    def __init__(
        self,
        model,
        tokenizer: WhisperTokenizer,
        options: DecodingOptions,
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model  # transformers WhisperForConditionalGeneration
        self.dtype = dtype
        decoder = model.model.decoder
        # float32 copies of the embeddings; the model's own position table is zeroed because
        # the embeddings are summed here (in float32) and passed in as ``inputs_embeds``.
        self.token_embedding = decoder.embed_tokens.weight.detach().float().clone()
        self.positional_embedding = decoder.embed_positions.weight.detach().float().clone()
        _to_dtype_keeping_fp32_layer_norms(decoder, dtype)
        with torch.no_grad():
            decoder.embed_positions.weight.zero_()
        self.logit_weight = self.token_embedding.to(dtype)
        # for half precision on CPU: a float32 copy of the (rounded) logit weights and their
        # row norms, for the bounded logits (see _next_tokens_bounded)
        self._logit_weight32: torch.Tensor | None = None
        self._logit_norms: torch.Tensor | None = None
        self._max_text_norm: torch.Tensor | None = None
        if _half_on_cpu(self.logit_weight):
            self._logit_weight32 = self.logit_weight.float()
            self._logit_norms = self._logit_weight32.double().norm(dim=-1).float()
            self._max_text_norm = self._logit_norms[: tokenizer.timestamp_begin].max()
        self.bounded_fallbacks = 0  # rows the bounded logits left to the half product
        self.tokenizer = tokenizer
        self.n_ctx = model.config.max_target_positions
        self._set_options(options)

    def _set_options(self, options: DecodingOptions) -> None:
        tok = self.tokenizer
        if options.language is not None and not tok.multilingual and options.language != "en":
            raise ValueError(f"language {options.language!r}: this model is English-only")
        self.options = options
        self.initial = self._initial_tokens()
        self.sample_begin = len(self.initial)
        self.sot_index = self.initial.index(tok.sot)
        self.suppress = self._suppress_tokens()
        # index tensors made once, not from Python lists at every step
        self._suppress_idx = torch.tensor(self.suppress, dtype=torch.long)
        self._blank_idx = torch.tensor(tok.encode(" ") + [tok.eot], dtype=torch.long)
        precision = N_AUDIO_CTX_SECONDS / self.model.config.max_source_positions
        self.time_precision = precision
        self.max_initial_ts_index = round(options.max_initial_timestamp / precision)

    def with_options(self, **changes) -> BatchDecoder:
        """A decoder sharing these weights with some options changed (a request's language
        or prompt); ``self`` is left as it was. Raises ValueError for a language the model
        does not know."""
        if not changes:
            return self
        other = copy.copy(self)
        other._set_options(replace(self.options, **changes))
        return other

    def ended_segment_at(self, tokens: list[int]) -> float | None:
        """Seconds into the window where decoding stopped after a complete segment, when the
        sampled ``tokens`` end with a timestamp pair (openai-whisper's transcribe then seeks
        to that timestamp and decodes the rest of the audio); None otherwise."""
        ts_begin = self.tokenizer.timestamp_begin
        if self.options.without_timestamps or len(tokens) < 2:
            return None
        if tokens[-1] >= ts_begin and tokens[-2] >= ts_begin:
            return (tokens[-1] - ts_begin) * self.time_precision
        return None

    def _initial_tokens(self) -> list[int]:
        tok, opts = self.tokenizer, self.options
        tokens = tok.sot_sequence(opts.language, opts.task)
        if opts.prompt:
            prompt = tok.encode(" " + opts.prompt.strip())
            tokens = [tok.sot_prev] + prompt[-(self.n_ctx // 2 - 1) :] + tokens
        return tokens

    def _suppress_tokens(self) -> list[int]:
        tok = self.tokenizer
        ids = [int(t) for t in self.options.suppress_tokens.split(",") if t.strip()]
        if -1 in ids:
            ids = [t for t in ids if t >= 0] + list(tok.non_speech_tokens)
        ids += [tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech]
        return sorted(set(ids))

    def _hidden(self, tokens, audio, cache) -> torch.Tensor:
        """The decoder's last hidden state [B, width] (in ``dtype``) after ``tokens``."""
        offset = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        embeds = self.token_embedding[tokens] + self.positional_embedding[positions]
        out = self.model.model.decoder(
            inputs_embeds=embeds.to(self.dtype),
            encoder_hidden_states=audio.to(self.dtype),
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state[:, -1]

    def _half_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits as upstream computes them: against the token embedding in ``dtype``."""
        return (hidden @ self.logit_weight.T).float()

    def _logits(self, tokens, audio, cache) -> torch.Tensor:
        return self._half_logits(self._hidden(tokens, audio, cache))

    def _next_tokens(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Greedy choice after the decoding rules, from the last hidden states."""
        if self._bounded_logits_pay(hidden):
            return self._next_tokens_bounded(hidden, tokens)
        logits = self._half_logits(hidden)
        self._apply_rules(logits, tokens)
        return logits.argmax(dim=-1)

    def _bounded_logits_pay(self, hidden: torch.Tensor) -> bool:
        """Half precision on CPU (no float16 units here: PyTorch's half matrix product costs
        the same per row, batched or not) and enough rows for a float32 product to be
        cheaper."""
        return (
            self._logit_weight32 is not None
            and _half_on_cpu(hidden)
            and hidden.shape[0] >= BOUNDED_LOGITS_MIN_ROWS
        )

    def _wide_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 logits ``s`` [B, V], per-row coefficient of the bound) for half ``hidden``."""
        wide = hidden.float()
        gamma = hidden.shape[-1] * 2.0**-24
        coef = (2.0 * gamma / (1.0 - gamma)) * 1.01 * wide.double().norm(dim=-1).float()
        return wide @ self._logit_weight32.T, coef

    @staticmethod
    def _logit_delta(coef, norms, s: torch.Tensor) -> torch.Tensor:
        """How far the half product's float32 sum can be from ``s``: twice the worst
        accumulation error (``coef`` times the weight row's norm), plus float32's rounding of
        ``s +- delta`` itself."""
        return coef * norms + s.abs().nan_to_num(0.0, posinf=0.0) * 2.0**-22

    def _next_tokens_bounded(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens the half-precision logits would pick, from a float32 product, exactly.

        A half-precision matrix product on CPU multiplies exactly and accumulates in float32,
        then rounds each sum to half: logit ``L_j = half(S_j)``, ``S_j`` within
        ``gamma * sum_k |h_k w_jk|`` of the exact dot product (``gamma ~ width * 2**-24``,
        whatever the order of the additions). The same product done in float32 here, ``s_j``,
        obeys the same bound, so ``half(s_j - d_j) <= L_j <= half(s_j + d_j)`` with
        ``d_j = 2 * gamma * |h| * |w_j|`` (Cauchy-Schwarz) plus float32's rounding of
        ``s_j +- d_j``; rounding is monotonic. A row's token is decided from these bounds
        only when every logit value within them gives the same decision: the timestamp
        rule's comparison (with a margin for its float32 rounding), and the best logit's
        lower bound above every other logit's upper bound. The other rows (near-ties: 0.8% of
        rows on the benchmark corpus) are recomputed in half precision and decided as usual, so the
        tokens are always those of the half-precision logits.
        """
        dtype = hidden.dtype
        s, coef = self._wide_logits(hidden)
        delta, norms = self._logit_delta, self._logit_norms

        def half(x: torch.Tensor) -> torch.Tensor:
            return x.to(dtype).float()

        self._apply_rules(s, tokens, timestamp_rule=False)  # the rules that mask by position
        unsure = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
        if not self.options.without_timestamps:
            ts_begin = self.tokenizer.timestamp_begin
            ts = s[:, ts_begin:]
            d_ts = delta(coef[:, None], norms[None, ts_begin:], ts)
            ts_lo = half(ts - d_ts).logsumexp(dim=-1)
            ts_hi = half(ts + d_ts).logsumexp(dim=-1)
            text_max = s[:, :ts_begin].max(dim=-1).values
            d_text = delta(coef, self._max_text_norm, text_max)
            text_lo, text_hi = half(text_max - d_text), half(text_max + d_text)
            # the rule compares log-probabilities rounded in float32: decide with a margin
            # (relative to the values' size, which sets float32's rounding)
            size = torch.stack([ts_hi, text_hi]).abs().nan_to_num(0.0, posinf=0.0).amax(0)
            margin = TIMESTAMP_RULE_MARGIN * (1.0 + size / 64.0)
            wins = ts_lo > text_hi + margin
            loses = ts_hi < text_lo - margin
            unsure |= ~(wins | loses)
            s[wins, :ts_begin] = -torch.inf
        top = s.topk(2, dim=-1)
        picked = top.indices[:, 0]
        best, second = top.values[:, 0], top.values[:, 1]
        d_best = delta(coef, norms[picked], best)
        d_second = delta(coef, norms.max(), second)
        # half overflows above 65504: leave such rows to the half product
        unsure |= ~(half(best - d_best) > half(second + d_second)) | ~(best.abs() < 6.5e4)
        rows = unsure.nonzero().squeeze(1)
        if len(rows):
            logits = self._half_logits(hidden[rows])
            self._apply_rules(logits, tokens[rows])
            picked[rows] = logits.argmax(dim=-1)
        self.bounded_fallbacks += len(rows)
        return picked

    def detect_language(self, audio: torch.Tensor) -> list[str]:
        """Most likely language of each item from the first decoder step after ``sot``."""
        tok = self.tokenizer
        sot = torch.full((audio.shape[0], 1), tok.sot, device=audio.device)
        logits = self._logits(sot, audio, None)
        codes = list(tok.language_tokens)
        lang_ids = torch.tensor(list(tok.language_tokens.values()), device=logits.device)
        best = logits[:, lang_ids].argmax(-1).tolist()
        return [codes[i] for i in best]

    def _apply_rules(
        self, logits: torch.Tensor, tokens: torch.Tensor, timestamp_rule: bool = True
    ) -> None:
        """openai-whisper's logit filters, in place; ``timestamp_rule`` False leaves out the
        one that depends on the logits' values (timestamps win when their total probability
        beats every text token)."""
        tok = self.tokenizer
        ts_begin = tok.timestamp_begin
        first_step = tokens.shape[1] == self.sample_begin
        if self.options.suppress_blank and first_step:
            logits.index_fill_(1, self._blank_idx.to(logits.device), -torch.inf)
        logits.index_fill_(1, self._suppress_idx.to(logits.device), -torch.inf)
        if self.options.without_timestamps:
            return
        logits[:, tok.no_timestamps] = -torch.inf
        sampled = tokens[:, self.sample_begin :]
        is_ts = sampled >= ts_begin
        n = sampled.shape[1]
        if n >= 1:
            last_ts = is_ts[:, -1]
            penult_ts = is_ts[:, -2] if n >= 2 else torch.ones_like(last_ts)
            logits[last_ts & penult_ts, ts_begin:] = -torch.inf
            logits[last_ts & ~penult_ts, : tok.eot] = -torch.inf
            # timestamps never decrease (the rule below keeps them so): the last is the max
            last_val = torch.where(is_ts, sampled, -1).amax(dim=1)
            limit = torch.where(last_ts & ~penult_ts, last_val, last_val + 1)
            cols = torch.arange(logits.shape[-1], device=logits.device)
            block = (cols >= ts_begin) & (cols < limit[:, None]) & is_ts.any(dim=1)[:, None]
            logits.masked_fill_(block, -torch.inf)
        if first_step:
            logits[:, :ts_begin] = -torch.inf
            logits[:, ts_begin + self.max_initial_ts_index + 1 :] = -torch.inf
        if not timestamp_rule:
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        ts_logprob = logprobs[:, ts_begin:].logsumexp(dim=-1)
        max_text = logprobs[:, :ts_begin].max(dim=-1).values
        logits[ts_logprob > max_text, :ts_begin] = -torch.inf

    @torch.inference_mode()
    def decode(self, audio: torch.Tensor) -> list[Decoded]:
        tok = self.tokenizer
        batch = audio.shape[0]
        device = audio.device
        tokens = torch.tensor([self.initial] * batch, device=device)
        languages: list[str | None] = [self.options.language] * batch
        if tok.multilingual and self.options.language is None:
            languages = list(self.detect_language(audio))
            lang_ids = [tok.language_tokens[lang] for lang in languages]
            tokens[:, self.sot_index + 1] = torch.tensor(lang_ids, device=device)
        rows = self._greedy(tokens, audio)
        results = []
        for row, lang in zip(rows, languages, strict=True):
            if tok.eot in row:
                row = row[: row.index(tok.eot)]
            results.append(Decoded(tokens=row, text=tok.decode(row).strip(), language=lang))
        return results

    def _relayout_cross_cache(self, cache: EncoderDecoderCache) -> None:
        """Store the cross-attention keys and values once in whisper's strides when the
        upstream-exact attention will ask for them, instead of copying them at every step
        (those copies were ~14% of a float16 CPU run)."""
        if self.dtype not in (torch.float16, torch.bfloat16) or self.model.device.type != "cpu":
            return
        for layer in cache.cross_attention_cache.layers:
            layer.keys = _whisper_strides(layer.keys)
            layer.values = _whisper_strides(layer.values)

    def _greedy(self, tokens: torch.Tensor, audio: torch.Tensor) -> list[list[int]]:
        """Sampled tokens of every row, EOT included when reached.

        Rows that have sampled EOT only get EOT appended from then on (as in whisper), so
        they leave the batch (cache rows, audio and tokens dropped) once they are at least
        a quarter of it: the rest decode without them. Dropping copies the whole
        cross-attention cache, hence the quarter rather than every finished row.
        """
        eot = self.tokenizer.eot
        done: dict[int, list[int]] = {}
        alive = list(range(tokens.shape[0]))  # original row of each row still decoding
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step_input = tokens
        for step in range(self.options.sample_len):
            hidden = self._hidden(step_input, audio, cache)
            if step == 0:
                self._relayout_cross_cache(cache)
            next_tokens = self._next_tokens(hidden, tokens)
            next_tokens[tokens[:, -1] == eot] = eot
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
            step_input = next_tokens[:, None]
            finished = next_tokens == eot
            n_finished = int(finished.sum())
            if tokens.shape[-1] > self.n_ctx or n_finished == len(alive):
                break
            if n_finished and 4 * n_finished >= len(alive):
                keep = (~finished).nonzero().squeeze(1)
                for i in finished.nonzero().squeeze(1).tolist():
                    done[alive[i]] = tokens[i, self.sample_begin :].tolist()
                alive = [alive[i] for i in keep.tolist()]
                tokens, audio, step_input = tokens[keep], audio[keep], step_input[keep]
                cache.batch_select_indices(keep)
                self._relayout_cross_cache(cache)
        for i, row in enumerate(tokens[:, self.sample_begin :].tolist()):
            done[alive[i]] = row
        return [done[i] for i in range(len(done))]
