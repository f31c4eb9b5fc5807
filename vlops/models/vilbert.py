"""A small reference ViLBERT (Lu et al. 2019) with a VQA head, built on the fused co-attention and patch stem.

Two streams, as in vilbert-multi-task's ``BertModel`` / ``VILBertForVLTasks``:

- text: word + position embeddings and LayerNorm (``embeddings``), then ``num_text_layers`` BERT layers
  (``encoder.layer``, plain PyTorch) with the key-padding mask of the PAD tokens;
- image: the "regions" are the image's patches, embedded by the ViT patch stem (``v_embeddings``: a
  stride-P projection, a learned global image token in front (ViLBERT's IMG token), position embedding
  and LayerNorm), fused into one :func:`vlops.patch_embed` call;
- then ``num_co_layers`` co-attention blocks (``encoder.c_layer``): ViLBERT's ``BertConnectionLayer``,
  :class:`vlops.nn.CoAttentionBlock` when ``fused`` and the eager
  :class:`vlops.reference.coattention.ViLBERTConnectionLayer` otherwise (the same state_dict keys). The
  text queries attend over the image tokens and the image queries over the text tokens, the PAD tokens
  masked as keys (ViLBERT's extended additive mask, which the fused block reads as key padding). Each
  block is followed by ``layers_per_block`` BERT layers in each stream (``encoder.layer`` for the text,
  ``encoder.v_layer``, ViLBERT's ``BertImageLayer``, for the image), where the IMG token gathers the
  regions: ViLBERT's layout ``v_biattention_id = [0, 1, ...]``, ``t_biattention_id = [n, n + 1, ...]``;
- pooling: the first text token and the IMG token, each through its pooler (``t_pooler`` / ``v_pooler``:
  linear + ReLU, as vilbert-multi-task's ``BertTextPooler`` / ``BertImagePooler``; ``pooler_act="tanh"``
  gives BERT's pooler), combined by elementwise product (``fusion_method="mul"``);
- the VQA head ``vil_prediction.logit_fc``: Linear, GeLU, LayerNorm, Linear to the answers (ViLBERT's
  ``SimpleClassifier``, hidden width ``2 * bi_hidden_size``).

    cfg = ViLBERTVQAConfig()                                   # sized for the synthetic data
    model = ViLBERT(cfg)                                       # fused=False: the eager reference
    qa = synthetic.make_vqa(64, torch.Generator().manual_seed(0))
    logits = model(qa.images, qa.question)                     # [64, len(synthetic.ANSWERS)]
    model.loss(qa.images, qa.question, qa.answer).backward()

``ViLBERT(cfg, fused=True)`` and ``ViLBERT(cfg, fused=False)`` have the same parameters, state_dict keys
and (for the same global seed) initial weights, and compute the same logits and gradients up to
rounding. With dropout (all dropout probabilities are 0 by default) the attention-probability dropout
masks of the two differ: the fused op draws a counter-based mask, the eager layer ``nn.Dropout``'s.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.coattention import CoAttentionBlock
from ..reference.coattention import ViLBERTConfig, ViLBERTConnectionLayer, activation, extended_attention_mask
from ..reference.patch_embed import patch_embed as eager_patch_embed
from ..stem import patch_embed as fused_patch_embed
from . import synthetic

__all__ = ["ViLBERTVQAConfig", "ViLBERT"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclasses.dataclass
class ViLBERTVQAConfig(ViLBERTConfig):
    """Sizes of :class:`ViLBERT`: vilbert-multi-task's ``BertConfig`` fields that the co-attention blocks
    read (inherited from :class:`vlops.reference.coattention.ViLBERTConfig`, with small defaults here) plus
    the model's own. The defaults fit the synthetic data of :mod:`vlops.models.synthetic`.

    Text stream: ``vocab_size`` (default ``len(synthetic.VOCAB)``), ``max_text_len`` (position embeddings;
    default 16, the tokenizer's length), ``hidden_size``, ``num_attention_heads`` and ``intermediate_size``
    of the text BERT layers; ``num_text_layers`` of them run before the co-attention.
    Image stream: ``image_size`` x ``image_size`` images with ``in_chans`` channels cut into ``patch_size``
    patches, embedded to ``v_hidden_size``; ``v_num_attention_heads`` and ``v_intermediate_size`` size the
    image BERT layers. ``sincos_pos_embed``: the patches' position embedding starts from MAE's 2-D
    sine-cosine table (the IMG token's from 0) instead of the normal init; it stays trainable. Without it
    the questions about places take far longer to learn (the regions' positions are all there is to go on).
    Co-attention: ``num_co_layers`` blocks of ``bi_num_attention_heads`` heads over ``bi_hidden_size``, each
    followed by ``layers_per_block`` BERT layers in each stream.
    Head: ``num_answers`` (default ``len(synthetic.ANSWERS)``), ``pooler_act`` ("relu" as ViLBERT, or
    "tanh" as BERT). ``exact_vilbert``: the fused blocks mask with ViLBERT's -10000 additive bias instead of
    exact zeros (the two agree whenever a question has a token that is not PAD, which
    :meth:`ViLBERT.forward` requires). ``initializer_range``: std of the normal init; BERT's 0.02 is made
    for widths of 768, and this small model learns several times faster from 0.07 (about PyTorch's default
    ``1 / sqrt(3 fan_in)`` at width 64). ``layer_norm_eps``: the eps of the model's own LayerNorms (BERT's
    1e-12, as the co-attention blocks').
    """
    hidden_size: int = 64
    v_hidden_size: int = 64
    bi_hidden_size: int = 64
    bi_num_attention_heads: int = 4
    intermediate_size: int = 128
    v_intermediate_size: int = 128
    attention_probs_dropout_prob: float = 0.0
    v_attention_probs_dropout_prob: float = 0.0
    hidden_dropout_prob: float = 0.0
    v_hidden_dropout_prob: float = 0.0
    vocab_size: int = len(synthetic.VOCAB)
    max_text_len: int = 16
    num_attention_heads: int = 4
    v_num_attention_heads: int = 4
    num_text_layers: int = 1
    num_co_layers: int = 2
    layers_per_block: int = 1
    image_size: int = 32
    patch_size: int = 8
    in_chans: int = 3
    num_answers: int = len(synthetic.ANSWERS)
    pooler_act: str = "relu"
    exact_vilbert: bool = False
    initializer_range: float = 0.07
    sincos_pos_embed: bool = True
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError / TypeError naming the field when a field is out of range or of the wrong type."""
        positive = ("hidden_size", "v_hidden_size", "bi_hidden_size", "bi_num_attention_heads", "intermediate_size",
                    "v_intermediate_size", "vocab_size", "max_text_len", "num_attention_heads", "v_num_attention_heads",
                    "num_co_layers", "image_size", "patch_size", "in_chans", "num_answers")
        for name in positive + ("num_text_layers", "layers_per_block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"config.{name} must be an int, got {type(v).__name__} {v!r}")
            lo = 1 if name in positive else 0
            if v < lo:
                raise ValueError(f"config.{name} must be >= {lo}, got {v}")
        if self.vocab_size < 3:
            raise ValueError(f"config.vocab_size must be >= 3 (PAD, BOS, EOS), got {self.vocab_size}")
        if self.num_answers < 2:
            raise ValueError(f"config.num_answers must be >= 2, got {self.num_answers}")
        for size, heads in (("hidden_size", "num_attention_heads"), ("v_hidden_size", "v_num_attention_heads"),
                            ("bi_hidden_size", "bi_num_attention_heads")):
            if getattr(self, size) % getattr(self, heads):
                raise ValueError(f"config.{size} ({getattr(self, size)}) must be a multiple of config.{heads} "
                                 f"({getattr(self, heads)})")
        if self.image_size % self.patch_size:
            raise ValueError(f"config.image_size ({self.image_size}) must be a multiple of config.patch_size "
                             f"({self.patch_size})")
        for name in ("attention_probs_dropout_prob", "v_attention_probs_dropout_prob", "hidden_dropout_prob",
                     "v_hidden_dropout_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"config.{name} must be a number in [0, 1), got {v!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"config.{name} must be a finite number > 0, got {v!r}")
        if self.pooler_act not in ("relu", "tanh"):
            raise ValueError(f"config.pooler_act must be 'relu' or 'tanh', got {self.pooler_act!r}")
        for name in ("exact_vilbert", "sincos_pos_embed"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"config.{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("hidden_act", "v_hidden_act"):
            act = getattr(self, name)
            if not callable(act) and act not in ("gelu", "relu", "swish"):
                raise ValueError(f"config.{name} must be 'gelu', 'relu', 'swish' or a callable, got {act!r}")

    @property
    def num_patches(self) -> int:
        """Image tokens after the IMG token: ``(image_size // patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2


# ------------------------------------------------------------------------------------------------ text stream

class TextEmbeddings(nn.Module):
    """``BertEmbeddings`` without token types: ``LayerNorm(word_embeddings(ids) + position_embeddings(pos))``."""

    def __init__(self, config: ViLBERTVQAConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_text_len, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        return self.dropout(self.LayerNorm(x))


def _stream(config: ViLBERTVQAConfig, stream: str, name: str):
    """``config.name`` for the text stream ("t"), ``config.v_name`` for the image stream ("v")."""
    return getattr(config, ("v_" if stream == "v" else "") + name)


class BertSelfAttention(nn.Module):
    """BERT self-attention (``query``, ``key``, ``value``) with an optional additive key mask [B, 1, 1, N]."""

    def __init__(self, config: ViLBERTVQAConfig, stream: str = "t"):
        super().__init__()
        width = _stream(config, stream, "hidden_size")
        self.num_attention_heads = _stream(config, stream, "num_attention_heads")
        self.attention_head_size = width // self.num_attention_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dropout = nn.Dropout(_stream(config, stream, "attention_probs_dropout_prob"))

    def _heads(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None):
        q, k, v = (self._heads(f(hidden_states)) for f in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).transpose(1, 2)
        return ctx.reshape(*ctx.shape[:-2], -1)


class BertSelfOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + x)``, ``width_in`` -> the stream's hidden size."""

    def __init__(self, width_in: int, config: ViLBERTVQAConfig, stream: str = "t"):
        super().__init__()
        width = _stream(config, stream, "hidden_size")
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(_stream(config, stream, "hidden_dropout_prob"))

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """``self`` (:class:`BertSelfAttention`) and ``output`` (:class:`BertSelfOutput`)."""

    def __init__(self, config: ViLBERTVQAConfig, stream: str = "t"):
        super().__init__()
        self.self = BertSelfAttention(config, stream)
        self.output = BertSelfOutput(_stream(config, stream, "hidden_size"), config, stream)

    def forward(self, hidden_states, attention_mask=None):
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertIntermediate(nn.Module):
    """``act(dense(x))``, the stream's hidden size -> its intermediate size."""

    def __init__(self, config: ViLBERTVQAConfig, stream: str = "t"):
        super().__init__()
        self.dense = nn.Linear(_stream(config, stream, "hidden_size"), _stream(config, stream, "intermediate_size"))
        self.intermediate_act_fn = activation(_stream(config, stream, "hidden_act"))

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertLayer(nn.Module):
    """A post-norm BERT layer (``attention``, ``intermediate``, ``output``) on one stream: ViLBERT's
    ``BertLayer`` (``stream="t"``) or ``BertImageLayer`` (``"v"``, the ``v_`` sizes)."""

    def __init__(self, config: ViLBERTVQAConfig, stream: str = "t"):
        super().__init__()
        self.attention = BertAttention(config, stream)
        self.intermediate = BertIntermediate(config, stream)
        self.output = BertSelfOutput(_stream(config, stream, "intermediate_size"), config, stream)

    def forward(self, hidden_states, attention_mask=None):
        a = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(a), a)


# ------------------------------------------------------------------------------------------------ image stream

def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The 2-D sine-cosine position table of MAE: [grid * grid, dim] (row-major patches); half the features
    encode the row, half the column, each as sines and cosines of geometric frequencies."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


class ImagePatchEmbeddings(nn.Module):
    """The image "regions": ``LayerNorm([img_token, proj(patches)] + pos_embed)``, [B, 1 + N, v_hidden].

    ``proj`` is a stride-``patch_size`` Conv2d, ``img_token`` [1, 1, v_hidden] the global IMG token,
    ``pos_embed`` [1, 1 + N, v_hidden] one position per token, ``LayerNorm`` the norm of every token
    (ViLBERT's ``BertImageEmbeddings.LayerNorm``). The whole stem is one :func:`vlops.patch_embed` call
    when ``fused``, else :func:`vlops.reference.patch_embed.patch_embed` (eager) on the same parameters.
    """

    def __init__(self, config: ViLBERTVQAConfig):
        super().__init__()
        D = config.v_hidden_size
        self.proj = nn.Conv2d(config.in_chans, D, kernel_size=config.patch_size, stride=config.patch_size)
        self.img_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, D))
        self.LayerNorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.v_hidden_dropout_prob)

    def forward(self, images: torch.Tensor, fused: bool = True) -> torch.Tensor:
        patch_embed = fused_patch_embed if fused else eager_patch_embed
        tokens = patch_embed(images, self.proj.weight, self.proj.bias, cls_token=self.img_token,
                             pos_embed=self.pos_embed, ln=(self.LayerNorm.weight, self.LayerNorm.bias,
                                                          self.LayerNorm.eps))
        return self.dropout(tokens)


# ------------------------------------------------------------------------------------------------ the model

class Encoder(nn.Module):
    """ViLBERT's ``BertEncoder``: ``layer`` (the text stream's BERT layers), ``v_layer`` (the image stream's),
    ``c_layer`` (the co-attention blocks).

    Order (ViLBERT's ``t_biattention_id = [n + i k]``, ``v_biattention_id = [i k]`` for ``n =
    num_text_layers``, ``k = layers_per_block``): the first ``n`` text layers; then for each co-attention
    block ``i``: the block, then ``k`` text layers and ``k`` image layers.
    """

    def __init__(self, config: ViLBERTVQAConfig, fused: bool):
        super().__init__()
        n, k, c = config.num_text_layers, config.layers_per_block, config.num_co_layers
        self.layer = nn.ModuleList([BertLayer(config, "t") for _ in range(n + c * k)])
        self.v_layer = nn.ModuleList([BertLayer(config, "v") for _ in range(c * k)])
        if fused:
            blocks = [CoAttentionBlock(config, exact_vilbert=config.exact_vilbert) for _ in range(config.num_co_layers)]
        else:
            blocks = [ViLBERTConnectionLayer(config) for _ in range(config.num_co_layers)]
        self.c_layer = nn.ModuleList(blocks)
        self.num_text_layers = n
        self.layers_per_block = k

    def forward(self, text, text_mask, image, image_mask):
        """``(text [B, Nt, hidden], image [B, Nv, v_hidden])`` after the encoder; ``text_mask`` is ViLBERT's
        additive [B, 1, 1, Nt] key mask, ``image_mask`` the image's (None or all zeros: no padding)."""
        n, k = self.num_text_layers, self.layers_per_block
        for layer in self.layer[:n]:
            text = layer(text, text_mask)
        for i, block in enumerate(self.c_layer):
            image, text, _ = block(image, image_mask, text, text_mask)
            for layer in self.layer[n + i * k:n + (i + 1) * k]:
                text = layer(text, text_mask)
            for layer in self.v_layer[i * k:(i + 1) * k]:
                image = layer(image)
        return text, image


class Pooler(nn.Module):
    """``act(dense(hidden_states[:, 0]))``: the first token to ``bi_hidden_size``."""

    def __init__(self, width_in: int, width_out: int, act: str):
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)
        self.activation = nn.ReLU() if act == "relu" else nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class SimpleClassifier(nn.Module):
    """ViLBERT's VQA head: ``logit_fc`` = Linear, GeLU, LayerNorm, Linear."""

    def __init__(self, width_in: int, width_hidden: int, width_out: int, eps: float):
        super().__init__()
        self.logit_fc = nn.Sequential(nn.Linear(width_in, width_hidden), nn.GELU(),
                                      nn.LayerNorm(width_hidden, eps=eps), nn.Linear(width_hidden, width_out))

    def forward(self, x):
        return self.logit_fc(x)


class ViLBERT(nn.Module):
    """ViLBERT with a VQA head (see the module docstring for the architecture).

    Args:
        config: a :class:`ViLBERTVQAConfig`, a dict of its fields, or None (the defaults).
        fused: True (default): the image stem is :func:`vlops.patch_embed` and the co-attention blocks are
            :class:`vlops.nn.CoAttentionBlock`; False: the eager references
            (:func:`vlops.reference.patch_embed.patch_embed`, :class:`vlops.reference.coattention.
            ViLBERTConnectionLayer`). Both have the same parameters and state_dict keys, so a state_dict of
            one loads into the other.

    The weights are initialised as BERT's (normal with std ``initializer_range``, zero biases, unit
    LayerNorms) from a seed drawn from torch's global generator, in parameter-name order: the same
    ``torch.manual_seed`` gives the same weights with ``fused=True`` and ``fused=False``.
    """

    def __init__(self, config=None, fused: bool = True):
        super().__init__()
        if config is None:
            config = ViLBERTVQAConfig()
        elif isinstance(config, dict):
            config = ViLBERTVQAConfig(**config)
        elif not isinstance(config, ViLBERTVQAConfig):
            raise TypeError(f"config must be a ViLBERTVQAConfig, a dict of its fields or None, got "
                            f"{type(config).__name__}")
        config.validate()
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.config = dataclasses.replace(config)  # a private copy: later edits of the caller's config do nothing
        self.fused = fused
        seed = int(torch.randint(0, 2**62, (1,)).item())
        c = self.config
        self.embeddings = TextEmbeddings(c)
        self.v_embeddings = ImagePatchEmbeddings(c)
        self.encoder = Encoder(c, fused)
        self.t_pooler = Pooler(c.hidden_size, c.bi_hidden_size, c.pooler_act)
        self.v_pooler = Pooler(c.v_hidden_size, c.bi_hidden_size, c.pooler_act)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.vil_prediction = SimpleClassifier(c.bi_hidden_size, 2 * c.bi_hidden_size, c.num_answers,
                                               c.layer_norm_eps)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """BERT's init from ``seed``: weights of linears, convolutions, embeddings, the IMG token and the
        position embeddings ~ N(0, initializer_range), biases 0, LayerNorm weights 1; with
        ``config.sincos_pos_embed`` the patches' position embedding is the sine-cosine table instead."""
        g = torch.Generator().manual_seed(int(seed))
        std = self.config.initializer_range
        for name, p in sorted(self.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            owner = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
            if isinstance(owner, nn.LayerNorm):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
        if self.config.sincos_pos_embed:
            grid = self.config.image_size // self.config.patch_size
            pos = self.v_embeddings.pos_embed
            pos[0, 1:].copy_(sincos_pos_embed(pos.shape[-1], grid))
            pos[0, 0].zero_()

    def extra_repr(self) -> str:
        return f"fused={self.fused}"

    # -------------------------------------------------------------------------------------------- checks

    def _param(self) -> torch.Tensor:
        return self.vil_prediction.logit_fc[0].weight

    def _check_inputs(self, images, question_tokens):
        c, p = self.config, self._param()
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, {c.in_chans}, {c.image_size}, {c.image_size}], got "
                            f"{type(images).__name__}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        want = (c.in_chans, c.image_size, c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want or images.shape[0] < 1:
            raise ValueError(f"images must have shape [B, {want[0]}, {want[1]}, {want[2]}] with B >= 1 "
                             f"(config in_chans, image_size), got {tuple(images.shape)}")
        if not isinstance(question_tokens, torch.Tensor):
            raise TypeError(f"question_tokens must be an integer torch.Tensor [B, L], got "
                            f"{type(question_tokens).__name__}")
        if question_tokens.dtype not in _INT_DTYPES:
            raise TypeError(f"question_tokens must be an integer tensor (int64 token ids), got {question_tokens.dtype}")
        B = images.shape[0]
        if question_tokens.ndim != 2 or question_tokens.shape[0] != B or not 1 <= question_tokens.shape[1] <= \
                c.max_text_len:
            raise ValueError(f"question_tokens must have shape [B, L] with B = {B} (the images' batch) and "
                             f"1 <= L <= {c.max_text_len} (config.max_text_len), got {tuple(question_tokens.shape)}")
        for name, t in (("images", images), ("question_tokens", question_tokens)):
            if t.device != p.device:
                raise ValueError(f"{name} is on {t.device} but the model is on {p.device}; put them on one device")
        ids = question_tokens.long()
        out_of_range = ((ids < 0) | (ids >= c.vocab_size)).any()
        all_pad = ~(ids != synthetic.PAD).any(1)
        bad_range, bad_pad = torch.stack([out_of_range, all_pad.any()]).tolist()  # one read for both checks
        if bad_range:
            raise ValueError(f"question_tokens must hold token ids in [0, {c.vocab_size}) (config.vocab_size), got "
                             f"min {int(ids.min())}, max {int(ids.max())}")
        if bad_pad:
            rows = all_pad.nonzero().flatten().tolist()[:8]
            raise ValueError(f"question_tokens rows {rows} are all PAD ({synthetic.PAD}); every question needs at "
                             f"least one token")
        return images.to(p.dtype), ids

    # -------------------------------------------------------------------------------------------- forward

    def forward(self, images: torch.Tensor, question_tokens: torch.Tensor) -> torch.Tensor:
        """Answer logits [B, num_answers] in the model's dtype.

        Args:
            images: [B, in_chans, image_size, image_size] floating point (converted to the model's dtype;
                the synthetic images are in [-1, 1]); not modified.
            question_tokens: [B, L] integer token ids, 1 <= L <= max_text_len, ``synthetic.PAD`` for padding
                (masked as keys in every attention); each row needs a token that is not PAD.
        """
        images, ids = self._check_inputs(images, question_tokens)
        dtype = images.dtype
        keep = ids != synthetic.PAD  # [B, L]
        text_mask = extended_attention_mask(keep, dtype)  # ViLBERT's (1 - mask) * -10000, [B, 1, 1, L]
        t = self.embeddings(ids)
        v = self.v_embeddings(images, self.fused)
        # the image stream has no padding: the fused blocks take None, the eager ones an all-zero additive mask
        image_mask = None if self.fused else torch.zeros(v.shape[0], 1, 1, v.shape[1], dtype=dtype, device=v.device)
        t, v = self.encoder(t, text_mask, v, image_mask)
        pooled = self.t_pooler(t) * self.v_pooler(v)  # ViLBERT's fusion_method "mul"
        return self.vil_prediction(self.dropout(pooled))

    def loss(self, images: torch.Tensor, question_tokens: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the answer logits against ``answer`` (integer [B] in [0, num_answers));
        float64 for a float64 model, float32 otherwise."""
        if not isinstance(answer, torch.Tensor):
            raise TypeError(f"answer must be an integer torch.Tensor [B], got {type(answer).__name__}")
        if answer.dtype not in _INT_DTYPES:
            raise TypeError(f"answer must be an integer tensor (answer ids), got {answer.dtype}")
        B = images.shape[0] if isinstance(images, torch.Tensor) and images.ndim >= 1 else None
        if answer.ndim != 1 or (B is not None and answer.shape[0] != B):
            raise ValueError(f"answer must have shape [B] with B = {B} (the images' batch), got {tuple(answer.shape)}")
        if answer.device != self._param().device:
            raise ValueError(f"answer is on {answer.device} but the model is on {self._param().device}")
        n = self.config.num_answers
        if answer.numel() and bool(((answer < 0) | (answer >= n)).any()):
            raise ValueError(f"answer must hold answer ids in [0, {n}) (config.num_answers), got min "
                             f"{int(answer.min())}, max {int(answer.max())}")
        logits = self(images, question_tokens)
        if logits.dtype != torch.float64:
            logits = logits.float()
        return F.cross_entropy(logits, answer.long())

    @torch.no_grad()
    def predict(self, images: torch.Tensor, question_tokens: torch.Tensor) -> torch.Tensor:
        """The predicted answer ids [B] (int64): the argmax of :meth:`forward`, without gradients. Call
        ``model.eval()`` first when the config has dropout."""
        return self(images, question_tokens).argmax(-1)
