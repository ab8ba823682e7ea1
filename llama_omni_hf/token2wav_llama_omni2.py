"""LLaMA-Omni2's speech decoder: CosyVoice2 token-to-wave in plain torch (spec `llama-omni2.md` 1.5, 2.6-2.8).

    speech tokens [N] (6561-way, 25 Hz)
      -> flow: embedding, UpsampleConformer encoder (x2 to 50 Hz), 10 Euler steps of conditional flow matching
         with classifier-free guidance through a causal U-Net (the "estimator")       -> mel [80, 2N]
      -> HiFT: F0 predictor, harmonic source, upsampling with source fusion, iSTFT     -> 24 kHz wave [960 N]

Submodule names are the original checkpoint keys (`flow.pt` keys under `flow.`, with `decoder.estimator.` as
`estimator.`; `hift.pt` keys under `hift.` with weight norm folded), so conversion is a table. Glossary:

    paper / CosyVoice2                 here                         original key
    speech token embedding             flow.input_embedding          input_embedding
    x-vector projection                flow.spk_embed_affine_layer   spk_embed_affine_layer
    chunk-aware causal encoder         flow.encoder                  encoder (UpsampleConformerEncoder)
    flow-matching decoder (U-Net)      flow.estimator                decoder.estimator (ConditionalDecoder)
    fixed initial noise                flow.noise                    decoder.rand_noise (not in flow.pt, Q5)
    vocoder                            hift                          hift.pt (HiFTGenerator)
    speaker x-vectors                  speakers.<name>               computed from prompt wavs at conversion

Chunks: every attention sees its own chunk (50 tokens = 100 mel frames = 2 s) and all earlier ones, and every
convolution of the flow is causal except the encoder's 3-token look-ahead. So whatever a COMPLETE chunk computes
is final once the 3 tokens after it exist. The streaming session `mode="original"` re-runs the whole prefix on every
call, as the original does (its cost grows with the answer); `mode="incremental"` keeps what complete chunks
leave behind (keys/values of every attention, per Euler step and guidance branch; the left context of every causal
convolution) in a `_Memory` and recomputes only the chunk still growing: the same chunks at a constant cost.
"""

from .transformers_compat import MIN_TRANSFORMERS_VERSION  # noqa: F401  (first: checks the installed release)

import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402
from transformers import initialization as init  # noqa: E402

from .configuration_llama_omni2 import LlamaOmni2Token2WavConfig  # noqa: E402

STREAM_MODES = ("incremental", "original")


def _seed0_noise(num_mels: int, frames: int) -> torch.Tensor:
    # upstream CosyVoice later drew rand_noise right after set_all_random_seed(0); the conversion default
    return torch.randn([1, num_mels, frames], generator=torch.Generator().manual_seed(0))


class _Memory:
    """What the complete chunks of a stream leave for later calls, for one level of the flow (tokens, encoder
    frames, or one Euler step of the estimator): attention keys/values and causal-convolution left context.

    `past` positions are final; `commit` is how many leading positions of the current call's segment become final
    (complete chunks). Keys/values live in one growing buffer per attention ([2, B, H, capacity, d]): the segment
    is written after the `past` positions and the next call overwrites what was not committed, so a call copies
    only its own positions, never the cache (which reaches gigabytes on long answers).
    """

    def __init__(self):
        self.store = {}
        self.past = 0  # positions before the current segment
        self.commit = 0

    def left_context(self, key: str, x: torch.Tensor, size: int) -> torch.Tensor:
        """x [B, C, T] of the segment -> [B, C, size + T] with the `size` positions before it (zeros at the start)."""
        past = self.store.get(key)
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], size)
        full = torch.cat([past, x], dim=-1)
        if self.commit:
            self.store[key] = full[..., self.commit : self.commit + size].clone()
        return full

    def keys_values(self, key: str, k: torch.Tensor, v: torch.Tensor):
        """k, v [B, H, T, d] of the segment -> keys/values of every position so far (past + segment), as views."""
        end = self.past + k.shape[2]
        buffer = self.store.get(key)
        if buffer is None or buffer.shape[3] < end:
            grown = k.new_empty(2, *k.shape[:2], max(end, int(1.25 * (0 if buffer is None else buffer.shape[3])) + 256),
                                k.shape[3])
            if buffer is not None:
                grown[:, :, :, : self.past] = buffer[:, :, :, : self.past]
            self.store[key] = buffer = grown
        buffer[0, :, :, self.past : end] = k
        buffer[1, :, :, self.past : end] = v
        return buffer[0, :, :, :end], buffer[1, :, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())


def _chunk_mask(start: int, length: int, chunk: int, device) -> torch.Tensor:
    """[length, start + length] bool: query at absolute position i sees key j < min(end of i's chunk, total)
    (CosyVoice's subsequent_chunk_mask with all left chunks, cut at the segment end)."""
    total = start + length
    query = torch.arange(start, total, device=device)
    limit = torch.clamp((query // chunk + 1) * chunk, max=total)
    return torch.arange(total, device=device)[None, :] < limit[:, None]


def _causal_conv(conv: nn.Conv1d, x: torch.Tensor, memory, key: str) -> torch.Tensor:
    """A padding-free Conv1d made causal: kernel - 1 frames of left context (zeros at the stream start)."""
    size = conv.kernel_size[0] - 1
    x = memory.left_context(key, x, size) if memory is not None else F.pad(x, (size, 0))
    return conv(x)


# ----------------------------------------------------------------------------------------------- flow encoder


def _relative_positions(d_model: int, r: torch.Tensor) -> torch.Tensor:
    """ESPnet relative sinusoids for distances r (query minus key): [sin, cos] interleaved, [len(r), d_model]."""
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    angle = r.float()[:, None] * div_term  # original: (+-position) * div_term, the same product in fp32
    pe = torch.zeros(len(r), d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe


@dataclass
class _RelativeGeometry:
    """What every layer of one encoder stack shares for a segment of `length` positions after `start` cached
    ones: the hidden keys, the sinusoids of the distances and where each (query, key) pair's distance sits."""

    masked: torch.Tensor  # [length, total] bool, True where the chunk mask hides the key
    pe: torch.Tensor  # [length + total - 1, d_model]: distances total - 1 down to -(length - 1)
    index: torch.Tensor  # [length, total]: column of distance i - j (what the original's rel_shift picks)

    @classmethod
    def build(cls, start: int, length: int, chunk: int, d_model: int, device) -> "_RelativeGeometry":
        total = start + length
        distances = torch.arange(total - 1, -length, -1)
        rows = torch.arange(length, device=device)[:, None]
        index = (length - 1 - rows) + torch.arange(total, device=device)[None, :]
        return cls(~_chunk_mask(start, length, chunk, device), _relative_positions(d_model, distances).to(device),
                   index)


class LlamaOmni2EncoderEmbed(nn.Module):
    """LinearNoSubsampling + EspnetRelPositionalEncoding: Linear -> LayerNorm -> (dropout) -> x * sqrt(d)."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        d = config.input_size
        norm = nn.LayerNorm(d, eps=config.encoder_embed_layer_norm_eps)
        self.out = nn.Sequential(nn.Linear(d, d), norm, nn.Dropout(0.1))
        self.xscale = math.sqrt(d)

    def forward(self, x):
        return self.out(x) * self.xscale


class LlamaOmni2RelPositionAttention(nn.Module):
    """RelPositionMultiHeadedAttention (Transformer-XL): scores ((q+u)k^T + (q+v)p^T shifted) / sqrt(d_k)."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        d, self.h = config.input_size, config.encoder_attention_heads
        self.d_k = d // self.h
        self.linear_q, self.linear_k, self.linear_v, self.linear_out = (nn.Linear(d, d) for _ in range(4))
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    def forward(self, x, geometry: _RelativeGeometry, memory=None, key: str = ""):
        batch, length, _ = x.shape
        q = self.linear_q(x).view(batch, length, self.h, self.d_k)  # [B, T, H, d_k]
        k = self.linear_k(x).view(batch, length, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(batch, length, self.h, self.d_k).transpose(1, 2)
        if memory is not None:
            k, v = memory.keys_values(key, k, v)
        p = self.linear_pos(geometry.pe.to(x)).view(-1, self.h, self.d_k)
        matrix_ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # [B, H, T, total]
        matrix_bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.permute(1, 2, 0))  # [B, H, T, R]
        matrix_bd = torch.gather(matrix_bd, -1, geometry.index.expand(batch, self.h, *geometry.index.shape))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        masked = geometry.masked
        attn = torch.softmax(scores.masked_fill(masked, -float("inf")), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, length, self.h * self.d_k)
        return self.linear_out(out)


class LlamaOmni2FeedForward(nn.Module):
    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        self.w_1 = nn.Linear(config.input_size, config.encoder_linear_units)
        self.w_2 = nn.Linear(config.encoder_linear_units, config.input_size)

    def forward(self, x):
        return self.w_2(F.silu(self.w_1(x)))


class LlamaOmni2ConformerLayer(nn.Module):
    """ConformerEncoderLayer as released: pre-norm, no macaron FFN, no convolution module."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        self.self_attn = LlamaOmni2RelPositionAttention(config)
        self.feed_forward = LlamaOmni2FeedForward(config)
        self.norm_ff = nn.LayerNorm(config.input_size, eps=config.encoder_layer_norm_eps)
        self.norm_mha = nn.LayerNorm(config.input_size, eps=config.encoder_layer_norm_eps)

    def forward(self, x, geometry: _RelativeGeometry, memory=None, key: str = ""):
        x = x + self.self_attn(self.norm_mha(x), geometry, memory, key)
        return x + self.feed_forward(self.norm_ff(x))


class LlamaOmni2PreLookahead(nn.Module):
    """PreLookaheadLayer: each token sees the next `pre_lookahead_len` (zeros past the end) and 2 earlier ones."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        d, self.lookahead = config.input_size, config.pre_lookahead_len
        self.conv1 = nn.Conv1d(d, d, kernel_size=self.lookahead + 1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3)

    def forward(self, x, memory=None):
        out = F.pad(x.transpose(1, 2), (0, self.lookahead))
        out = F.leaky_relu(self.conv1(out))  # original: default slope 0.01
        out = _causal_conv(self.conv2, out, memory, "pre_lookahead_layer.conv2")
        return out.transpose(1, 2) + x


class LlamaOmni2UpsampleEncoder(nn.Module):
    """UpsampleConformerEncoder: embed -> look-ahead -> 6 layers (50-token chunks) -> nearest x2 + causal conv
    -> embed -> 4 layers (100-frame chunks) -> after_norm. [B, N, 512] tokens -> [B, 2N, 512] frames."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        d = config.input_size
        self.chunk = config.encoder_chunk_size
        self.stride = config.token_mel_ratio
        self.embed = LlamaOmni2EncoderEmbed(config)
        self.pre_lookahead_layer = LlamaOmni2PreLookahead(config)
        self.encoders = nn.ModuleList(LlamaOmni2ConformerLayer(config) for _ in range(config.encoder_num_blocks))
        self.up_layer = nn.Module()
        self.up_layer.conv = nn.Conv1d(d, d, 2 * self.stride + 1)
        self.up_embed = LlamaOmni2EncoderEmbed(config)
        self.up_encoders = nn.ModuleList(LlamaOmni2ConformerLayer(config) for _ in range(config.encoder_num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=config.encoder_embed_layer_norm_eps)

    def forward(self, x, token_memory=None, frame_memory=None):
        x = self.pre_lookahead_layer(self.embed(x), token_memory)
        geometry = self._geometry(x, self.chunk, token_memory)
        for i, layer in enumerate(self.encoders):
            x = layer(x, geometry, token_memory, f"encoders.{i}")
        # Upsample1D: nearest x2, then a causal conv over 2 * stride frames of left context
        up = F.interpolate(x.transpose(1, 2), scale_factor=float(self.stride), mode="nearest")
        x = _causal_conv(self.up_layer.conv, up, frame_memory, "up_layer.conv").transpose(1, 2)
        x = self.up_embed(x)
        geometry = self._geometry(x, self.chunk * self.stride, frame_memory)
        for i, layer in enumerate(self.up_encoders):
            x = layer(x, geometry, frame_memory, f"up_encoders.{i}")
        return self.after_norm(x)

    @staticmethod
    def _geometry(x, chunk: int, memory) -> _RelativeGeometry:
        start = memory.past if memory is not None else 0
        return _RelativeGeometry.build(start, x.shape[1], chunk, x.shape[-1], x.device)


# ----------------------------------------------------------------------------------------------- estimator


class LlamaOmni2CausalBlock(nn.Module):
    """CausalBlock1D: causal conv k3 -> LayerNorm over channels -> Mish (`block.1`/`.3` are the transposes)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.ModuleList([nn.Conv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out)])

    def forward(self, x, memory=None, key: str = ""):
        x = _causal_conv(self.block[0], x, memory, key)
        return F.mish(self.block[2](x.transpose(1, 2)).transpose(1, 2))


class LlamaOmni2CausalResnet(nn.Module):
    """CausalResnetBlock1D: block1 -> + Linear(Mish(t)) -> block2, plus a 1x1 residual projection."""

    def __init__(self, dim: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = LlamaOmni2CausalBlock(dim, dim_out)
        self.block2 = LlamaOmni2CausalBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x, t, memory=None, key: str = ""):
        h = self.block1(x, memory, f"{key}.block1")
        h = h + self.mlp(t).unsqueeze(-1)
        h = self.block2(h, memory, f"{key}.block2")
        return h + self.res_conv(x)


class LlamaOmni2EstimatorAttention(nn.Module):
    """diffusers `Attention` as Matcha's BasicTransformerBlock builds it: q/k/v without bias, to_out with."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, mask: torch.Tensor, memory=None, key: str = ""):
        """x [B, T, C]; mask [T, past + T] bool, True where a key is visible."""
        batch, length, _ = x.shape

        def heads(t):
            return t.view(batch, -1, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        if memory is not None:
            k, v = memory.keys_values(key, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class LlamaOmni2TransformerBlock(nn.Module):
    """Matcha BasicTransformerBlock with layer norms, self-attention only and a GELU feed-forward."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        dim = config.estimator_channels
        inner = dim * config.estimator_ff_mult
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = LlamaOmni2EstimatorAttention(dim, config.estimator_num_heads, config.estimator_attention_head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        gelu = nn.Module()
        gelu.proj = nn.Linear(dim, inner)
        self.ff.net = nn.ModuleList([gelu, nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x, mask: torch.Tensor, memory=None, key: str = ""):
        x = self.attn1(self.norm1(x), mask, memory, key) + x
        h = F.gelu(self.ff.net[0].proj(self.norm3(x)))  # diffusers GELU: exact erf form
        return self.ff.net[2](h) + x


def _timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Matcha SinusoidalPosEmb: [sin, cos] of scale * t * 10000^(-k / (dim/2 - 1))."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    emb = scale * t.unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class LlamaOmni2FlowEstimator(nn.Module):
    """ConditionalDecoder(causal=True, channels=[256]): a flat one-level causal U-Net predicting the flow's velocity.

    Keys keep the original's nesting: `down_blocks.0.{0: resnet, 1.K: transformer blocks, 2: causal conv}`,
    `mid_blocks.M.{0, 1.K}`, `up_blocks.0.{0, 1.K, 2}`, `final_block`, `final_proj`, `time_mlp.linear_{1,2}`.
    """

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        c, c_in = config.estimator_channels, config.estimator_in_channels
        time_dim = 4 * c
        self.in_channels = c_in
        self.chunk = config.estimator_chunk_size
        self.time_mlp = nn.Module()
        self.time_mlp.linear_1 = nn.Linear(c_in, time_dim)
        self.time_mlp.linear_2 = nn.Linear(time_dim, time_dim)

        def blocks():
            return nn.ModuleList(LlamaOmni2TransformerBlock(config) for _ in range(config.estimator_n_blocks))

        self.down_blocks = nn.ModuleList([nn.ModuleList([
            LlamaOmni2CausalResnet(c_in, c, time_dim), blocks(), nn.Conv1d(c, c, 3)])])
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([LlamaOmni2CausalResnet(c, c, time_dim), blocks()])
            for _ in range(config.estimator_num_mid_blocks)
        )
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            LlamaOmni2CausalResnet(2 * c, c, time_dim), blocks(), nn.Conv1d(c, c, 3)])])
        self.final_block = LlamaOmni2CausalBlock(c, c)
        self.final_proj = nn.Conv1d(c, config.num_mels, 1)

    @staticmethod
    def _attend(x, blocks, mask, memory, key):
        x = x.transpose(1, 2)
        for k, block in enumerate(blocks):
            x = block(x, mask, memory, f"{key}.1.{k}")
        return x.transpose(1, 2)

    def forward(self, x, mu, t, spks, cond, memory=None):
        """x, mu, cond [B, 80, T]; t [B]; spks [B, 80] -> velocity [B, 80, T]. Masks are all ones (batch of one)."""
        t = self.time_mlp.linear_2(F.silu(self.time_mlp.linear_1(_timestep_embedding(t, self.in_channels).to(t.dtype))))
        x = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)
        # one chunk mask for all 56 blocks: the U-Net keeps the length
        mask = _chunk_mask(memory.past if memory is not None else 0, x.shape[-1], self.chunk, x.device)
        resnet, blocks, conv = self.down_blocks[0]
        x = self._attend(resnet(x, t, memory, "down_blocks.0.0"), blocks, mask, memory, "down_blocks.0")
        skip = x
        x = _causal_conv(conv, x, memory, "down_blocks.0.2")
        for m, (resnet, blocks) in enumerate(self.mid_blocks):
            x = self._attend(resnet(x, t, memory, f"mid_blocks.{m}.0"), blocks, mask, memory, f"mid_blocks.{m}")
        resnet, blocks, conv = self.up_blocks[0]
        x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
        x = self._attend(resnet(x, t, memory, "up_blocks.0.0"), blocks, mask, memory, "up_blocks.0")
        x = _causal_conv(conv, x, memory, "up_blocks.0.2")
        return self.final_proj(self.final_block(x, memory, "final_block"))


# ----------------------------------------------------------------------------------------------- flow


@dataclass
class _FlowMemory:
    """The incremental flow's state: positions [0, tokens) of the stream are final and cached here."""

    tokens: int = 0
    token_level: _Memory = field(default_factory=_Memory)
    frame_level: _Memory = field(default_factory=_Memory)
    steps: list = field(default_factory=list)  # one _Memory per Euler step

    def nbytes(self) -> int:
        """Bytes held (about 240 MB per second of audio at the released size: the estimator's keys and values for
        56 attention blocks x 10 Euler steps x 2 guidance rows)."""
        return sum(level.nbytes() for level in (self.token_level, self.frame_level, *self.steps))


class LlamaOmni2Flow(nn.Module):
    """CausalMaskedDiffWithXvec + CausalConditionalCFM: speech tokens and an x-vector -> 80-bin mel at 50 Hz."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.num_mels)
        self.encoder = LlamaOmni2UpsampleEncoder(config)
        self.encoder_proj = nn.Linear(config.input_size, config.num_mels)
        self.estimator = LlamaOmni2FlowEstimator(config)
        self.register_buffer("noise", _seed0_noise(config.num_mels, config.noise_frames))

    def speaker(self, xvector: torch.Tensor) -> torch.Tensor:
        """x-vector [1, 192] -> [1, 80]; only its direction matters (original: F.normalize first)."""
        return self.spk_embed_affine_layer(F.normalize(xvector, dim=1))

    def forward(self, tokens: torch.Tensor, spks: torch.Tensor, finalize: bool = True, memory=None):
        """tokens LongTensor [N] (all tokens so far), spks [1, 80] -> mel [1, 80, L].

        L = 2N, or 2N - 6 when not `finalize` (frames whose look-ahead saw zero padding are dropped, as in the
        original). With `memory`, only frames from 2 * memory.tokens on are computed and returned.
        """
        cfg = self.config
        start = memory.tokens if memory is not None else 0
        length = 2 * len(tokens) - (0 if finalize else cfg.pre_lookahead_len * cfg.token_mel_ratio)
        if length > cfg.noise_frames:
            raise ValueError(f"{len(tokens)} speech tokens need {length} mel frames, more than the flow's noise "
                             f"({cfg.noise_frames} frames, {cfg.noise_frames // 50} s): split the answer")
        if memory is not None:
            # chunks complete in this call (the 3 tokens after them exist) become final: commit them
            complete = (len(tokens) - cfg.pre_lookahead_len) // cfg.encoder_chunk_size * cfg.encoder_chunk_size
            commit = max(0, complete - start) if not finalize else 0
            self._begin(memory, start, commit)
        x = self.input_embedding(tokens[start:].clamp(min=0))[None]  # [1, N - start, 512]
        h = self.encoder(x, *(memory.token_level, memory.frame_level) if memory is not None else (None, None))
        mu = self.encoder_proj(h[:, : length - 2 * start]).transpose(1, 2).contiguous()  # [1, 80, L - 2 start]
        noise = self.noise[:, :, 2 * start : length].to(mu)
        mel = self._solve_euler(noise, mu, spks, memory)
        if memory is not None:
            memory.tokens = start + memory.token_level.commit
        return mel

    def _begin(self, memory: _FlowMemory, start: int, commit: int):
        memory.token_level.past, memory.token_level.commit = start, commit
        if not memory.steps:
            memory.steps = [_Memory() for _ in range(self.config.n_timesteps)]
        for level in (memory.frame_level, *memory.steps):
            level.past, level.commit = 2 * start, 2 * commit

    def _solve_euler(self, x, mu, spks, memory):
        """10 Euler steps on the cosine schedule, classifier-free guidance v = 1.7 v(mu, spk) - 0.7 v(0, 0)."""
        cfg = self.config
        t_span = torch.linspace(0, 1, cfg.n_timesteps + 1, device=mu.device, dtype=mu.dtype)
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        # original: t advances by dt and each next dt is t_span[k + 1] - t (so t is not exactly t_span[k])
        t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
        # the guidance batch: row 0 conditioned, row 1 with mu, speaker and cond zeroed (cond is all zeros here)
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.zeros_like(mu_in)
        for step in range(1, len(t_span)):
            level = memory.steps[step - 1] if memory is not None else None
            v = self.estimator(torch.cat([x, x]), mu_in, t.expand(2), spks_in, cond_in, level)
            v, v_uncond = v[:1], v[1:]
            v = (1.0 + cfg.inference_cfg_rate) * v - cfg.inference_cfg_rate * v_uncond
            x = x + dt * v
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()


# ----------------------------------------------------------------------------------------------- HiFT


class LlamaOmni2Snake(nn.Module):
    """Snake with linear alpha: x + 1/(alpha + 1e-9) * sin^2(alpha x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class LlamaOmni2ResBlock(nn.Module):
    """HiFT ResBlock: per dilation, Snake -> dilated conv -> Snake -> conv, residual."""

    def __init__(self, channels: int, kernel_size: int, dilations):
        super().__init__()

        def conv(d):
            return nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(LlamaOmni2Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(LlamaOmni2Snake(channels) for _ in dilations)

    def forward(self, x):
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class LlamaOmni2F0Predictor(nn.Module):
    """ConvRNNF0Predictor (no RNN despite the name): 5 x (conv k3 -> ELU), Linear -> |f0| per mel frame."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        c = config.f0_predictor_channels
        layers = []
        for i in range(5):
            layers += [nn.Conv1d(config.num_mels if i == 0 else c, c, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, 1)

    def forward(self, mel):
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))  # [B, T]


def _hann_window(n_fft: int) -> torch.Tensor:
    """scipy get_window('hann', n_fft, fftbins=True): periodic, computed in float64, stored as float32."""
    fac = np.linspace(-np.pi, np.pi, n_fft + 1)
    return torch.from_numpy((0.5 + 0.5 * np.cos(fac))[:n_fft].astype(np.float32))


class LlamaOmni2HiFT(nn.Module):
    """HiFTGenerator (neural source filter + iSTFTNet): mel [B, 80, T] -> 24 kHz wave [B, 480 T]."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__()
        self.config = config
        base = config.hift_base_channels
        self.m_source = nn.Module()
        self.m_source.l_linear = nn.Linear(config.nb_harmonics + 1, 1)
        self.conv_pre = nn.Conv1d(config.num_mels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))
        )
        stft_channels = config.istft_n_fft + 2
        rates = np.cumprod([1] + config.upsample_rates[::-1][:-1])[::-1]  # 15, 3, 1: source frames per level
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(rates, config.source_resblock_kernel_sizes,
                                          config.source_resblock_dilation_sizes)):
            ch, u = base // 2 ** (i + 1), int(u)
            self.source_downs.append(nn.Conv1d(stft_channels, ch, 1) if u == 1 else
                                     nn.Conv1d(stft_channels, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(LlamaOmni2ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            LlamaOmni2ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(base // 2 ** len(self.ups), stft_channels, 7, padding=3)
        self.f0_predictor = LlamaOmni2F0Predictor(config)

    def source(self, f0: torch.Tensor, generator=None, nsf_noise: bool = True) -> torch.Tensor:
        """SourceModuleHnNSF: f0 [B, T] -> excitation [B, 1, 480 T]. Random draws in the original's order:
        phases U(-pi, pi) [B, 9, 1] (CPU), noise randn [B, 9, S], then an unused randn [B, S, 1]."""
        cfg = self.config
        f0 = F.interpolate(f0[:, None], scale_factor=float(cfg.samples_per_frame), mode="nearest")  # [B, 1, S]
        batch, harmonics, samples = f0.shape[0], cfg.nb_harmonics + 1, f0.shape[-1]
        rates = torch.cat([f0 * (i + 1) / cfg.sampling_rate for i in range(harmonics)], dim=1)  # [B, 9, S]
        theta = 2 * np.pi * (torch.cumsum(rates, dim=-1) % 1)
        uv = (f0 > cfg.nsf_voiced_threshold).to(torch.float32)
        if nsf_noise:
            low, high = torch.tensor(-np.pi, dtype=torch.float32), torch.tensor(np.pi, dtype=torch.float32)
            rand = torch.rand((batch, harmonics, 1), generator=generator,
                              device=generator.device if generator is not None else "cpu")
            phase = (low + rand.cpu() * (high - low)).to(f0.device)  # torch.distributions.Uniform.sample
            phase[:, 0, :] = 0
            noise = self._randn((batch, harmonics, samples), generator, f0.device)
            self._randn((batch, samples, 1), generator, f0.device)  # original: drawn and unused, still consumed
        else:
            phase, noise = torch.zeros(batch, harmonics, 1, device=f0.device), torch.zeros_like(rates)
        sine = cfg.nsf_alpha * torch.sin(theta + phase)
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        sine = sine * uv + noise_amp * noise
        return torch.tanh(self.m_source.l_linear(sine.transpose(1, 2))).transpose(1, 2)

    @staticmethod
    def _randn(shape, generator, device):
        if generator is None:
            return torch.randn(shape, device=device)
        return torch.randn(shape, generator=generator, device=generator.device).to(device)

    def forward(self, mel, cache_source=None, generator=None, nsf_noise: bool = True):
        """mel [B, 80, T] -> (wave [B, 480 T], source [B, 1, 480 T]); the source starts with `cache_source`."""
        cfg = self.config
        s = self.source(self.f0_predictor(mel), generator, nsf_noise)
        if cache_source is not None and cache_source.shape[-1]:
            s[:, :, : cache_source.shape[-1]] = cache_source
        window = _hann_window(cfg.istft_n_fft).to(mel.device)
        spec = torch.view_as_real(torch.stft(s.squeeze(1), cfg.istft_n_fft, cfg.istft_hop_length, cfg.istft_n_fft,
                                             window=window, return_complex=True))
        s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1)  # [B, 18, S / 4 + 1]
        x = self.conv_pre(mel)
        per_level = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * per_level : (i + 1) * per_level]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / per_level
        x = self.conv_post(F.leaky_relu(x))  # original: torch's default slope 0.01 here, not lrelu_slope (Q8)
        bins = cfg.istft_n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :bins]), max=1e2)
        phase = torch.sin(x[:, bins:])  # original: sin of the phase channels ("actually, sin is redundancy")
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wave = torch.istft(spec, cfg.istft_n_fft, cfg.istft_hop_length, cfg.istft_n_fft, window=window)
        return torch.clamp(wave, -cfg.audio_limit, cfg.audio_limit), s


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class LlamaOmni2Token2WavStreamState:
    """One caller's token-to-wave stream (spec 2.8); made by `init_stream`, advanced by `stream`.

    The session keeps, as the original's does, every token so far, `token_offset` (tokens whose mel was handed to
    HiFT, minus the 3 look-ahead ones), and the HiFT cache: the last 8 mel frames, 3840 source samples and the
    3840 withheld speech samples that the next chunk cross-fades with. `flow_memory` (incremental mode only)
    holds the complete chunks' keys/values and convolution context.
    """

    mode: str
    spks: torch.Tensor  # [1, 80] projected speaker embedding
    generator: object = None
    nsf_noise: bool = True
    tokens: list = field(default_factory=list)
    token_offset: int = 0
    mel_cache: torch.Tensor = None  # [1, 80, 8]
    source_cache: torch.Tensor = None  # [1, 1, 3840]
    speech_cache: torch.Tensor = None  # [1, 3840]
    flow_memory: _FlowMemory = None
    samples_emitted: int = 0
    finished: bool = False


class LlamaOmni2Token2WavPreTrainedModel(PreTrainedModel):
    config_class = LlamaOmni2Token2WavConfig
    config: LlamaOmni2Token2WavConfig
    base_model_prefix = "token2wav"
    main_input_name = "units"
    # original: flow_inference.py sets flow.decoder.fp16 = False and HiFT has no half path: both run in fp32
    _keep_in_fp32_modules_strict = ["flow", "hift", "speakers"]
    _no_split_modules = ["LlamaOmni2Flow", "LlamaOmni2HiFT"]

    @torch.no_grad()
    def _init_weights(self, module):
        # torch's own fan-in init (the flow and HiFT are not transformers layers; 0.02 normals make silence)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight[0][0].numel()
                if isinstance(module, nn.ConvTranspose1d):
                    fan_in = module.weight.shape[0] * module.weight[0][0].numel()
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LlamaOmni2Snake):
            init.ones_(module.alpha)
        elif isinstance(module, LlamaOmni2RelPositionAttention):
            init.xavier_uniform_(module.pos_bias_u)
            init.xavier_uniform_(module.pos_bias_v)

    @torch.no_grad()
    def initialize_weights(self):
        # buffers live on parameter-free modules, which transformers counts as initialized: fill them here.
        # `init.copy_` leaves loaded tensors alone and fills only missing ones.
        super().initialize_weights()
        cfg = self.config
        init.copy_(self.flow.noise, _seed0_noise(cfg.num_mels, cfg.noise_frames).to(self.flow.noise))
        for i, name in enumerate(cfg.speakers):
            vector = torch.randn(cfg.spk_embed_dim, generator=torch.Generator().manual_seed(i + 1))
            init.copy_(getattr(self.speakers, name), vector.to(getattr(self.speakers, name)))

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """transformers' `from_pretrained`, but missing or mis-shaped weights are an error (a half-random decoder
        speaks noise); `allow_missing_weights=True` restores transformers' default."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", ()))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if (missing or mismatched) and not allow_missing_weights:
            shown = ", ".join(missing[:8] + mismatched[:8])
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weights and has {len(mismatched)} of the wrong shape for "
                f"{cls.__name__}: {shown}. Is it a converted cosy2_decoder? (convert flow.pt / hift.pt with "
                "conversion/convert_cosy2_decoder.py; allow_missing_weights=True loads anyway with random weights)"
            )
        return (model, info) if want_info else model


class LlamaOmni2Token2Wav(LlamaOmni2Token2WavPreTrainedModel):
    """Speech tokens -> 24 kHz waveform, offline (`token2wav`) or streamed (`init_stream` / `stream`)."""

    def __init__(self, config: LlamaOmni2Token2WavConfig):
        super().__init__(config)
        # fp32 even when built under another default dtype (`_from_config(dtype=torch.float16)`)
        self.flow = LlamaOmni2Flow(config).float()
        self.hift = LlamaOmni2HiFT(config).float()
        self.speakers = nn.Module()
        for name in config.speakers:
            self.speakers.register_buffer(name, torch.zeros(config.spk_embed_dim, dtype=torch.float32))
        self.post_init()

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    # ----- inputs -----

    def speaker_embedding(self, speaker=None) -> torch.Tensor:
        """A stored voice name ("en", "zh", ...) or any x-vector [192] / [1, 192] -> float32 [1, 192]."""
        cfg = self.config
        device = self.flow.noise.device
        if speaker is None or isinstance(speaker, str):
            name = cfg.default_speaker if speaker is None else speaker
            if name not in cfg.speakers:
                raise ValueError(f"unknown speaker {name!r}; this checkpoint has {cfg.speakers} (or pass an x-vector "
                                 f"tensor of {cfg.spk_embed_dim} floats)")
            return getattr(self.speakers, name).float()[None]
        vector = torch.as_tensor(speaker)
        if vector.is_complex() or not vector.is_floating_point() or vector.numel() != cfg.spk_embed_dim or \
                vector.dim() not in (1, 2):
            raise ValueError(f"`speaker` must be a voice name or a float x-vector [{cfg.spk_embed_dim}] or "
                             f"[1, {cfg.spk_embed_dim}], got {tuple(vector.shape)} {vector.dtype}")
        vector = vector.reshape(1, -1).to(device=device, dtype=torch.float32)
        if not torch.isfinite(vector).all() or not vector.abs().sum() > 0:
            raise ValueError("the speaker x-vector must be finite and not all zeros (only its direction is used)")
        return vector

    def _check_units(self, units, allow_empty: bool = False) -> torch.Tensor:
        limit = self.config.vocab_size
        if isinstance(units, torch.Tensor):
            if units.is_floating_point() or units.is_complex() or units.dim() > 2 or \
                    (units.dim() == 2 and units.shape[0] != 1):
                raise ValueError(f"`units` must be integer speech tokens [N] (or [1, N]), got {tuple(units.shape)} "
                                 f"{units.dtype}")
            units = units.reshape(-1).long()
        else:
            try:
                units = torch.as_tensor(list(units), dtype=torch.long).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(f"`units` must be a sequence of integer speech tokens, got {units!r:.80}") from error
        if not units.numel() and not allow_empty:
            raise ValueError("`units` is empty: there is no speech to decode")
        if units.numel() and (int(units.min()) < 0 or int(units.max()) >= limit):
            raise ValueError(f"speech tokens must be in [0, {limit}), got min {int(units.min())} and max "
                             f"{int(units.max())} (LLaMA-Omni2 tokens are TTS ids minus 151666)")
        return units.to(self.flow.noise.device)

    # ----- offline -----

    @torch.no_grad()
    def mel(self, units, speaker=None, finalize: bool = True) -> torch.Tensor:
        """The flow alone: units [N] -> mel [1, 80, 2N] (2N - 6 without `finalize`), the original's
        `flow.inference` with an empty prompt."""
        units = self._check_units(units)
        return self.flow(units, self.flow.speaker(self.speaker_embedding(speaker)), finalize)

    @torch.no_grad()
    def token2wav(self, units, speaker=None, generator: torch.Generator = None, nsf_noise: bool = True) -> torch.Tensor:
        """Speech tokens [N] -> float32 waveform [960 N] at 24 kHz, the original's offline path.

        Args:
            units: ints in [0, 6561), a list or a LongTensor [N] / [1, N].
            speaker: "en", "zh" (the checkpoint's voices) or an x-vector [192]; default `config.default_speaker`.
            generator: draws HiFT's source phases and noise (default: torch's global RNG, as the original).
            nsf_noise: False zeroes those draws (phase 0, no noise): deterministic audio for tests.
        """
        mel = self.mel(units, speaker)
        wave, _ = self.hift(mel, generator=generator, nsf_noise=nsf_noise)
        return wave[0]

    def forward(self, units, speaker=None, generator=None, nsf_noise: bool = True):
        return self.token2wav(units, speaker, generator, nsf_noise)

    # ----- streaming -----

    def init_stream(self, speaker=None, mode: str = "incremental", generator: torch.Generator = None,
                    nsf_noise: bool = True) -> LlamaOmni2Token2WavStreamState:
        """Start a stream; the caller keeps the state and passes it to every `stream` call.

        Args:
            mode: "incremental" (default) caches what complete 2 s chunks computed, so each call costs the same
                however long the answer; "original" re-runs the whole prefix per call, as LLaMA-Omni2 does. Both
                return the same chunks (to float32 rounding).
            speaker, generator, nsf_noise: as in `token2wav`; the generator is drawn from at every HiFT call.
        """
        if mode not in STREAM_MODES:
            raise ValueError(f"`mode` must be one of {STREAM_MODES}, got {mode!r}")
        with torch.no_grad():
            spks = self.flow.speaker(self.speaker_embedding(speaker))
        memory = _FlowMemory() if mode == "incremental" else None
        return LlamaOmni2Token2WavStreamState(mode=mode, spks=spks, generator=generator, nsf_noise=nsf_noise,
                                             flow_memory=memory)

    @torch.no_grad()
    def stream(self, state: LlamaOmni2Token2WavStreamState, new_units, final: bool = False) -> torch.Tensor:
        """Add speech tokens; return the samples that are ready, float32 [S] at 24 kHz (possibly empty).

        The original's session (spec 2.8): the mel from `token_offset` on goes to HiFT behind the 8 cached frames;
        a non-final chunk withholds its last 3840 samples, which the next chunk cross-fades in with Hamming halves;
        `final=True` emits everything left (it may come with no new tokens) and closes the stream. A call that
        cannot fill the 8-frame cache yet (fewer than 7 tokens so far; the original crashes there, Q15) or brings
        no tokens keeps them and returns nothing.
        """
        if state.finished:
            raise ValueError("this stream is finished (final=True was passed); start another with init_stream()")
        units = self._check_units(new_units, allow_empty=True)
        state.tokens.extend(units.tolist())
        cfg = self.config
        lookahead = cfg.pre_lookahead_len * cfg.token_mel_ratio
        frames = 2 * len(state.tokens) - (0 if final else lookahead) - 2 * state.token_offset
        cached = cfg.mel_cache_len if state.mel_cache is not None else 0
        if not final and (not units.numel() or frames + cached < cfg.mel_cache_len):
            return self.flow.noise.new_zeros(0)
        if final and not state.tokens:
            state.finished = True
            return self.flow.noise.new_zeros(0)
        tokens = torch.tensor(state.tokens, dtype=torch.long, device=self.flow.noise.device)
        memory = state.flow_memory
        start = memory.tokens if memory is not None else 0  # the flow returns frames from 2 * start on
        mel = self.flow(tokens, state.spks, finalize=final, memory=memory)
        mel = mel[:, :, 2 * (state.token_offset - start):]
        return self._vocode_chunk(state, mel, final)

    def _vocode_chunk(self, state: LlamaOmni2Token2WavStreamState, mel: torch.Tensor, final: bool) -> torch.Tensor:
        """HiFT on [cached mel, new mel], the cross-fade, and the cache for the next chunk (spec 2.8)."""
        cfg = self.config
        if state.mel_cache is not None:
            mel = torch.cat([state.mel_cache, mel], dim=2)
        wave, source = self.hift(mel, state.source_cache, state.generator, state.nsf_noise)
        if state.speech_cache is not None:
            wave = _fade_in(wave, state.speech_cache)
        if final:
            state.finished = True
            state.token_offset = len(state.tokens)
        else:
            keep = cfg.source_cache_len
            state.mel_cache = mel[:, :, -cfg.mel_cache_len:]
            state.source_cache = source[:, :, -keep:]
            state.speech_cache = wave[:, -keep:]
            wave = wave[:, :-keep]
            state.token_offset = len(state.tokens) - cfg.pre_lookahead_len
        state.samples_emitted += wave.shape[-1]
        return wave[0]


def _fade_in(wave: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The original's fade_in_out: the first len(previous) samples become wave * w[:n] + previous * w[n:] with
    w = np.hamming(2n) (float64; the halves sum to ~1.08, not 1, Q7). Out of place: the original updates an
    inference tensor in place, which raises on CPU."""
    n = previous.shape[-1]
    window = torch.from_numpy(np.hamming(2 * n)).to(wave.device)
    head = (wave[..., :n].double() * window[:n] + previous.double() * window[n:]).to(wave.dtype)
    return torch.cat([head, wave[..., n:]], dim=-1)


__all__ = [
    "LlamaOmni2Token2Wav",
    "LlamaOmni2Token2WavPreTrainedModel",
    "LlamaOmni2Token2WavStreamState",
    "STREAM_MODES",
]
