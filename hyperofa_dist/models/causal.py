"""The causal-LM objective (Llama, Mistral, Qwen, Gemma sources): next-token loss over prepare's packed blocks,
attention kept inside each document, and a chunked cross-entropy that never holds the [tokens x V] logits.
Pure torch, no DeepSpeed.

What a block holds (data_prep/prepare/packing.py, formats/shards.py): every corpus line, the corpus' unit of text
and here the *document*, is followed by the separator (the tokenizer's sep, else eos: `</s>`,
`<|end_of_text|>`); the stream of lines is cut into pieces and every piece framed as `[start] piece [end]` (start:
cls, else bos; end: the separator again). A held-out block shorter than one block ends in padding. Neighbouring
lines of a block are unrelated text (prepare samples lines), so a line should not read its neighbours.

Documents (`attention="document"`, the default): a separator opens the next document. Token t belongs to
document d(t) = the number of separators at positions <= t, so every document starts with a start token at
position 0 (the block's start token for the first, the previous line's separator for the others), positions
restart there (RoPE sees what a one-line input would give), and the attention mask is block-causal: token t reads
token s only when s <= t and d(s) = d(t). The mask is a 4D float additive mask in the model's dtype (0 / dtype
min), which the eager and sdpa attention of every HF decoder take as it is; a bool 4D mask would be wrong under
eager (it is added to the scores), and `position_ids` restarts alone are honoured only without a KV cache
(research memo of issue 16, §4). `attention="block"` is the plain causal LM over the whole block (HF's
group_texts convention: lines read their predecessors), with no mask at all (the kernels' causal fast path).

Labels: position t predicts token t+1, for every t before the last two real positions: the last real token is
the frame's end (a frame, never the end of a line: prepare writes a line's own separator inside the piece), so
it is never a target, and nothing follows it. Padding is never a target and, being after every real token, is
never read by one. Predicting the separator after a line (its end) and the first token of a line from its start
token alone are both targets.

The loss: `ChunkedLinearCE` computes sum_t [logsumexp(z_t) - z_t[y_t]] with z_t = head(h_t), chunk by chunk
over tokens. Forward keeps only each token's logsumexp; backward recomputes each chunk's logits to form the
gradients, so nothing vocabulary-sized lives between forward and backward and at most one chunk's [c x V] logits
(fp32) exist at any time (memo §3: 5.8 GiB for full logits at V = 128,256 and 4,096 tokens, about 1 GiB in
chunks of 1,024). The head is the model's own output projection with its family's logit transform (Gemma's
soft-capping, Cohere's scale, Granite's divisor; `head_transform`), so the loss is the stock model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

IGNORE = -100
ATTENTION = ("document", "block")


# --- blocks -> positions, mask, labels -------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """The ids prepare framed the blocks with: start (cls/bos), separator (sep/eos) and padding (None when the
    tokenizer has no pad token of its own, as prepare decides: a pad equal to start or separator never pads)."""

    start: int
    sep: int
    pad: Optional[int] = None

    @classmethod
    def of(cls, start: int, sep: int, pad: Optional[int]) -> "Frame":
        return cls(int(start), int(sep), None if pad is None or pad in (start, sep) else int(pad))


def recorded_frame(special_tokens: Optional[dict[str, Any]], tokenizer: Any, where: Any) -> Frame:
    """The frame of a prepare directory's blocks: as its manifest recorded it (`special_tokens`), else as prepare
    takes it from the tokenizer that made them (cls or bos, sep or eos, pad)."""
    recorded = special_tokens or {}
    if recorded.get("cls") is not None and recorded.get("sep") is not None:
        return Frame.of(recorded["cls"], recorded["sep"], recorded.get("pad"))
    from ..formats.tokenizer import frame_ids

    return Frame.of(*frame_ids(tokenizer, where), tokenizer.pad_token_id)


@dataclass
class Layout:
    position_ids: Optional[torch.Tensor]  # [B, N] restarting per document; None: 0..N-1
    documents: Optional[torch.Tensor]  # [B, N] document index per token; None: one causal sequence
    labels: torch.Tensor  # [B, N] the next token, IGNORE where nothing is predicted

    def attention_mask(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """[B, 1, N, N] additive mask (0 where token t may read token s, dtype min elsewhere), or None."""
        if self.documents is None:
            return None
        n = self.documents.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.documents.device).tril()
        allowed = causal & (self.documents.unsqueeze(2) == self.documents.unsqueeze(1))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1)


def real_tokens(input_ids: torch.Tensor, frame: Frame) -> torch.Tensor:
    """True on every position that is not trailing padding."""
    if frame.pad is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return input_ids != frame.pad


def next_token_labels(input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """labels[t] = ids[t+1] for t + 2 < (real tokens of the row); IGNORE elsewhere (see the module docstring)."""
    n = input_ids.shape[1]
    count = real.sum(dim=1, keepdim=True)
    positions = torch.arange(n, device=input_ids.device).unsqueeze(0)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    return labels.masked_fill(positions + 2 >= count, IGNORE)


def block_layout(input_ids: torch.Tensor, frame: Frame, attention: str = "document") -> Layout:
    """Positions, documents and labels of a batch of blocks [B, N]."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    real = real_tokens(input_ids, frame)
    labels = next_token_labels(input_ids, real)
    if attention == "block":
        return Layout(None, None, labels)
    n = input_ids.shape[1]
    opens = (input_ids == frame.sep) & real
    documents = torch.cumsum(opens.long(), dim=1)
    index = torch.arange(n, device=input_ids.device).expand_as(input_ids)
    starts = torch.where(opens, index, torch.zeros_like(index))
    # The latest document start at or before t; position 0 starts the block's first document.
    first = torch.cummax(starts, dim=1).values
    return Layout(index - first, documents, labels)


# --- the head and its loss ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadTransform:
    """z = scale * (h W^T + b), then z <- cap * tanh(z / cap) when `softcap`: what the family's forward does to
    the output projection before the softmax."""

    scale: float = 1.0
    softcap: Optional[float] = None


def head_transform(config: Any) -> HeadTransform:
    """The logit post-processing of the decoder families transformers ships with one (a loss that bypasses the
    model's forward must repeat it): Gemma 2/3 `final_logit_softcapping`, Cohere `logit_scale` (a factor),
    Granite `logits_scaling` (a divisor)."""
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    scale = 1.0
    if get("logit_scale") is not None:
        scale *= float(get("logit_scale"))
    if get("logits_scaling") is not None:
        scale /= float(get("logits_scaling"))
    cap = get("final_logit_softcapping")
    return HeadTransform(scale, float(cap) if cap else None)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], t: HeadTransform,
                  acc: torch.dtype, inplace: bool = True) -> torch.Tensor:
    """transform(h W^T + b) in `acc`; `inplace` (inside the Function, where autograd records nothing) reuses the
    one [c, V] buffer."""
    logits = F.linear(h, weight, bias).to(acc)
    if t.scale != 1.0:
        logits = logits.mul_(t.scale) if inplace else logits * t.scale
    if t.softcap is not None:
        logits = logits.div_(t.softcap).tanh_().mul_(t.softcap) if inplace else torch.tanh(logits / t.softcap) * t.softcap
    return logits


class ChunkedLinearCE(torch.autograd.Function):
    """sum over labelled tokens of -log softmax(transform(h W^T + b))[y], computed `chunk` tokens at a time.

    Forward saves (h, W, b, labels, logsumexp per token); backward recomputes each chunk's logits and builds
    dL/dh (in h's dtype), dL/dW and dL/db (accumulated in fp32 at least, the matmul in W's dtype). Softmax and
    loss are in fp32 (fp64 stays fp64)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, transform: HeadTransform):
        acc = torch.promote_types(weight.dtype, torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[s : s + chunk], weight, bias, transform, acc)
            y = labels[s : s + chunk]
            valid = y != IGNORE
            part = torch.logsumexp(logits, dim=-1)
            lse[s : s + chunk] = part
            target = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
            total += ((part - target) * valid).sum()
        ctx.chunk, ctx.transform = chunk, transform
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        t, chunk, acc = ctx.transform, ctx.chunk, lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], labels[s : s + chunk]
            valid = y != IGNORE
            logits = _chunk_logits(h, weight, bias, t, acc)
            # d(cap * tanh(z / cap))/dz = 1 - (capped / cap)^2, taken before the softmax overwrites the logits.
            capped = 1.0 - (logits / t.softcap).square_() if t.softcap is not None else None
            p = logits.sub_(lse[s : s + chunk].unsqueeze(1)).exp_()  # softmax, in place: one [c, V] buffer
            p[rows[: len(y)], torch.where(valid, y, 0)] -= 1.0  # dL/dz = softmax - onehot
            if capped is not None:
                p.mul_(capped)
                del capped
            p.mul_((valid.to(acc) * grad_output.to(acc) * t.scale).unsqueeze(1))
            g = p.to(weight.dtype)
            if need_h:
                grad_h[s : s + chunk] = (g @ weight).to(hidden.dtype)
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.T, h.to(acc))
                else:  # half-precision weights: the matmul on the fast path, the sum over chunks in fp32
                    grad_w.add_(g.T @ h.to(weight.dtype))
            if need_b:
                grad_b.add_(p.sum(0))
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk: int = 1024,
    transform: HeadTransform = HeadTransform(),
) -> torch.Tensor:
    """Sum of the token losses of hidden [T, H] under the head (weight [V, H], bias [V]) against labels [T]
    (IGNORE skipped). chunk = 0 computes the full [T, V] logits at once (the reference the chunks must equal)."""
    if chunk <= 0:
        acc = torch.promote_types(weight.dtype, torch.float32)
        logits = _chunk_logits(hidden, weight, bias, transform, acc, inplace=False)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return ChunkedLinearCE.apply(hidden, weight, bias, labels, int(chunk), transform)


def output_head(model: Any) -> tuple[torch.nn.Parameter, Optional[torch.nn.Parameter]]:
    """(weight, bias) of a causal LM's output projection (the embedding matrix itself when tied)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no linear output projection")
    return head.weight, getattr(head, "bias", None)


def body_of(model: Any) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def causal_lm_loss(
    model: Any,
    input_ids: torch.Tensor,
    layout: Layout,
    *,
    chunk: int = 1024,
    transform: Optional[HeadTransform] = None,
) -> tuple[torch.Tensor, int]:
    """(mean next-token loss over the labelled positions, their count) of an HF causal LM on blocks [B, N]."""
    dtype = model.get_input_embeddings().weight.dtype
    hidden = body_of(model)(
        input_ids=input_ids,
        attention_mask=layout.attention_mask(dtype),
        position_ids=layout.position_ids,
        use_cache=False,
    ).last_hidden_state
    weight, bias = output_head(model)
    labels = layout.labels.reshape(-1)
    n = int((labels != IGNORE).sum())
    total = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels, bias=bias, chunk=chunk,
        transform=transform or head_transform(model.config),
    )
    # n = 0 keeps the graph (a zero loss with zero gradients): every rank runs the same backward collectives.
    return total / max(n, 1), n


def labelled_nll(
    model: Any,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int = 1024,
    transform: Optional[HeadTransform] = None,
) -> tuple[torch.Tensor, int]:
    """(sum of the token losses, their count) at the labelled positions of hidden [..., H] (padding and other
    IGNORE positions never reach the head)."""
    where = labels != IGNORE
    weight, bias = output_head(model)
    total = linear_cross_entropy(hidden[where], weight, labels[where], bias=bias, chunk=chunk,
                                 transform=transform or head_transform(model.config))
    return total, int(where.sum())


def hf_labels(layout: Layout) -> torch.Tensor:
    """The same targets in HF's unshifted convention (`model(..., labels=)` shifts by one itself)."""
    out = torch.full_like(layout.labels, IGNORE)
    out[:, 1:] = layout.labels[:, :-1]
    return out
