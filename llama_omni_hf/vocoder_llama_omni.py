"""LLaMA-Omni's unit vocoder: fairseq's unit HiFi-GAN with a duration predictor (CodeHiFiGAN), spec section 5.

Plain torch, run as transformers remote code next to `config.json`. Submodule names are the fairseq
checkpoint keys, so conversion is `fold_weight_norm` followed by a rename-free `load_state_dict`:

    dict                                 unit embedding [num_embeddings, embedding_dim]
    dur_predictor.{conv1.0,ln1,conv2.0,ln2,proj}   duration predictor (sees +-2 units with kernel 3)
    conv_pre, ups.N, resblocks.N.convs{1,2}.M, conv_post   the HiFi-GAN generator

Batches: padded frames are multiplied by zero before every convolution, so each item of a padded batch
gets the samples it would get alone (a "same" convolution pads with zeros either way).

Streaming: `init_stream` makes a `LlamaOmniVocoderStreamState` owned by the caller (the module holds weights
only, so several streams can share one vocoder). `stream` vocodes the units that are ready together with
`left_context` already-vocoded units and `lookahead` units held back, and returns only the new samples;
durations of already-vocoded units are kept, so the concatenated chunks follow the offline waveform.
`left_context=0, lookahead=0` is the original's method: every chunk vocoded on its own (seams, and
durations of chunk-edge units predicted without their neighbours).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_llama_omni import LlamaOmniVocoderConfig

# Defaults of `init_stream`, chosen by streamed-vs-offline SNR at the released size with seeded random weights
# (tests/test_vocoder.py). lookahead >= 2 is needed for exact durations (the duration predictor sees +-2
# units; 0 or 1 shifts the audio: ~10-20 dB); 2 -> 4 adds 16-27 dB at Omega=10 and delays only the first
# audio, by 2 units (less than one LLM step, which yields several units). left_context costs compute only
# and stopped helping at 4; 8 leaves room for trained weights (the generator reaches +-20 frames).
DEFAULT_LEFT_CONTEXT = 8
DEFAULT_LOOKAHEAD = 4


def fold_weight_norm(state_dict: dict) -> dict:
    """Replace every weight-norm pair by the plain weight it stands for: w = v * g / ||v||.

    Handles fairseq/legacy keys (`X.weight_g`, `X.weight_v`) and torch parametrization keys
    (`X.parametrizations.weight.original0` = g, `...original1` = v). The norm is over all dims but 0
    (legacy weight norm, dim 0): for a ConvTranspose1d weight [in, out, k] dim 0 is the INPUT channel axis.
    Other keys are copied unchanged; the input dict is not modified.
    """
    out = {}
    for key, value in state_dict.items():
        names = _weight_norm_keys(key)
        if names is None:
            out[key] = value
            continue
        weight_key, g_key, v_key = names
        if g_key not in state_dict or v_key not in state_dict:
            raise ValueError(f"weight-norm key {key!r} needs both {g_key!r} and {v_key!r}")
        if weight_key not in out:
            out[weight_key] = _fold(state_dict[g_key], state_dict[v_key])
    return out


# (g suffix, v suffix): fairseq / legacy torch weight_norm, then torch.nn.utils.parametrizations.weight_norm
_WEIGHT_NORM_SUFFIXES = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)


def _weight_norm_keys(key: str):
    """(weight key, g key, v key) if `key` is half of a weight-norm pair, else None."""
    for g_suffix, v_suffix in _WEIGHT_NORM_SUFFIXES:
        for suffix in (g_suffix, v_suffix):
            if key.endswith(suffix):
                prefix = key[: -len(suffix)]
                return prefix + "weight", prefix + g_suffix, prefix + v_suffix
    return None


def _fold(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    v32 = v.float()
    norm = v32.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))  # [dim0] -> [dim0, 1, ...]
    return (v32 * (g.float().view_as(norm) / norm)).to(v.dtype)


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B] lengths -> [B, size] bool, True on real positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def _frame_mask(lengths: torch.Tensor, size: int, dtype: torch.dtype):
    """[B, 1, size] multiplier zeroing padded frames, or None when nothing is padded."""
    if bool((lengths == size).all()):
        return None
    return _length_mask(lengths, size).unsqueeze(1).to(dtype)


def _masked(x: torch.Tensor, mask):
    return x if mask is None else x * mask


class LlamaOmniDurationPredictor(nn.Module):
    """fairseq VariancePredictor: log(1 + duration) of every unit from its embedding and +-2 neighbours."""

    def __init__(self, config: LlamaOmniVocoderConfig):
        super().__init__()
        dim, hidden = config.embedding_dim, config.duration_predictor_hidden_dim
        kernel = config.duration_predictor_kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(config.duration_predictor_dropout)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """x [B, T, C] with padded units zero, mask [B, T, 1] or None -> log durations [B, T]."""
        for conv, norm in ((self.conv1, self.ln1), (self.conv2, self.ln2)):
            x = conv(x.transpose(1, 2)).transpose(1, 2)  # conv on [B, C, T], back to [B, T, C]
            x = _masked(self.dropout(norm(x)), mask)
        return self.proj(x).squeeze(-1)  # [B, T, 1] -> [B, T]


class LlamaOmniResBlock(nn.Module):
    """HiFi-GAN resblock "1": per dilation d, x = x + c2(lrelu(c1_d(lrelu(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations, slope: float):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.slope = slope

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            xt = _masked(conv1(F.leaky_relu(x, self.slope)), mask)
            x = x + _masked(conv2(F.leaky_relu(xt, self.slope)), mask)
        return x


@dataclass
class LlamaOmniVocoderStreamState:
    """One caller's vocoder stream; made by `LlamaOmniVocoder.init_stream`, advanced by `stream`.

    Holds at most `left_context` vocoded units plus the units not vocoded yet, so the cost of a call does
    not grow with the stream. Absolute positions count units since the start of the stream.
    """

    left_context: int
    lookahead: int
    chunk_size: int = 1
    units: list = field(default_factory=list)  # units [units_start, units_received)
    durations: list = field(default_factory=list)  # final frame counts of units [units_start, units_done)
    units_start: int = 0
    units_received: int = 0
    units_done: int = 0  # units whose samples were returned
    samples_emitted: int = 0
    finished: bool = False


class LlamaOmniVocoder(nn.Module):
    """Units [B, T] -> 16 kHz waveform [B, S]; `code_hop_size` (320) samples per frame after durations."""

    def __init__(self, config: LlamaOmniVocoderConfig):
        super().__init__()
        _check_vocoder_config(config)
        self.config = config
        channels = config.upsample_initial_channel
        slope = config.leaky_relu_slope
        self.dict = nn.Embedding(config.num_embeddings, config.embedding_dim)
        self.dur_predictor = LlamaOmniDurationPredictor(config)
        self.conv_pre = nn.Conv1d(config.embedding_dim, channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            c_in, c_out = channels // 2**i, channels // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2))
            for k, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(LlamaOmniResBlock(c_out, k, dilations, slope))
        self.conv_post = nn.Conv1d(channels // 2 ** len(self.ups), 1, 7, padding=3)

    # ----- offline -----

    def forward(self, units, unit_lengths=None, durations=None):
        """Vocode a padded batch of unit sequences.

        Args:
            units: LongTensor [B, T] of ids in [0, num_embeddings); positions >= unit_lengths are ignored.
            unit_lengths: LongTensor [B] (default: all T).
            durations: LongTensor [B, T] of frames per unit (>= 0); default: the duration predictor's.
        Returns:
            (waveform FloatTensor [B, S] padded with zeros, lengths LongTensor [B] in samples =
            sum(durations) * code_hop_size).
        """
        units, unit_lengths, mask = self._check_units(units, unit_lengths)
        x = self._embed(units, mask)  # [B, T, C]
        if durations is None:
            durations = self._durations(x, mask)
        else:
            durations = self._check_durations(durations, units) * mask
        frame_lengths = durations.sum(dim=1)  # [B]
        sample_lengths = frame_lengths * self.config.code_hop_size
        if int(frame_lengths.sum()) == 0:
            return x.new_zeros(units.shape[0], 0), sample_lengths
        frames = self._repeat(x, durations, frame_lengths)
        return self._generate(frames, frame_lengths), sample_lengths

    @torch.no_grad()
    def predict_durations(self, units, unit_lengths=None) -> torch.Tensor:
        """Frames per unit, LongTensor [B, T]: clamp(round(exp(log_dur) - 1), min=1); 0 on padding."""
        units, unit_lengths, mask = self._check_units(units, unit_lengths)
        x = self._embed(units, mask)  # [B, T, C]
        return self._durations(x, mask)

    def _embed(self, units: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dict(units) * mask.unsqueeze(-1).to(self.dict.weight.dtype)  # padded units -> 0

    def _durations(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 0:
            return mask.long()
        log_dur = self.dur_predictor(x, mask.unsqueeze(-1).to(x.dtype))  # [B, T]
        durations = torch.clamp(torch.round(torch.exp(log_dur.float()) - 1).long(), min=1)
        return durations * mask

    @staticmethod
    def _repeat(x: torch.Tensor, durations: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        """[B, T, C] units -> [B, C, F] frames, unit t repeated durations[b, t] times, zero padded."""
        batch, length, dim = x.shape
        flat = torch.repeat_interleave(x.reshape(batch * length, dim), durations.reshape(-1), dim=0)
        items = flat.split(frame_lengths.tolist())  # B tensors [F_b, C]
        return nn.utils.rnn.pad_sequence(items, batch_first=True).transpose(1, 2)

    def _generate(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """HiFi-GAN generator: frames [B, C, F] -> waveform [B, F * code_hop_size], padding zeroed."""
        mask = _frame_mask(lengths, frames.shape[-1], frames.dtype)
        x = _masked(self.conv_pre(frames), mask)
        num_kernels = len(self.config.resblock_kernel_sizes)
        for i, (up, rate) in enumerate(zip(self.ups, self.config.upsample_rates)):
            lengths = lengths * rate
            mask = _frame_mask(lengths, x.shape[-1] * rate, x.dtype)
            x = _masked(up(F.leaky_relu(x, self.config.leaky_relu_slope)), mask)
            blocks = self.resblocks[i * num_kernels : (i + 1) * num_kernels]
            x = sum(block(x, mask) for block in blocks) / num_kernels
        # original: this leaky_relu has torch's DEFAULT slope 0.01, not leaky_relu_slope (spec section 5)
        x = self.conv_post(F.leaky_relu(x))
        return _masked(torch.tanh(x), mask).squeeze(1)  # [B, 1, S] -> [B, S]

    def _check_units(self, units, unit_lengths):
        if not isinstance(units, torch.Tensor) or units.dim() != 2 or units.is_floating_point():
            got = tuple(units.shape) if isinstance(units, torch.Tensor) else type(units).__name__
            raise ValueError(f"`units` must be an integer tensor [batch, length], got {got}; use units[None] for one")
        batch, length = units.shape
        if unit_lengths is None:
            unit_lengths = torch.full((batch,), length, dtype=torch.long, device=units.device)
        unit_lengths = torch.as_tensor(unit_lengths, device=units.device).long()
        if unit_lengths.shape != (batch,) or (batch and (unit_lengths.min() < 0 or unit_lengths.max() > length)):
            raise ValueError(f"`unit_lengths` must be [{batch}] values in [0, {length}], got {unit_lengths.tolist()}")
        mask = _length_mask(unit_lengths, length)  # [B, T]
        real = units[mask]
        limit = self.config.num_embeddings
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= limit):
            raise ValueError(
                f"unit ids must be in [0, {limit}) (the vocoder's num_embeddings), got min {int(real.min())} and "
                f"max {int(real.max())}; drop CTC blanks ({limit}) and padding before vocoding"
            )
        return units.long().masked_fill(~mask, 0), unit_lengths, mask

    @staticmethod
    def _check_durations(durations, units):
        if not isinstance(durations, torch.Tensor) or durations.is_floating_point() or durations.shape != units.shape:
            got = tuple(durations.shape) if isinstance(durations, torch.Tensor) else type(durations).__name__
            raise ValueError(f"`durations` must be an integer tensor shaped like `units` {tuple(units.shape)}, "
                             f"got {got}")
        durations = durations.to(units.device).long()
        if durations.numel() and int(durations.min()) < 0:
            raise ValueError(f"`durations` must be >= 0, got {int(durations.min())}")
        return durations

    # ----- streaming -----

    def init_stream(self, left_context: int = DEFAULT_LEFT_CONTEXT, lookahead: int = DEFAULT_LOOKAHEAD,
                    chunk_size: int = 1, independent: bool = False) -> LlamaOmniVocoderStreamState:
        """Start a stream; the caller keeps the returned state and passes it to every `stream` call.

        Args:
            left_context: already-vocoded units vocoded again before new ones (costs compute, not latency).
            lookahead: newest units held back as right context until more arrive or `final` (delays the
                first audio by that many units). Both >= 2 give every unit its offline duration (the
                duration predictor sees +-2 units); less shifts the audio after each chunk.
            chunk_size: Omega, the fewest ready units worth a vocoder call (fewer calls, later audio).
            independent: the original's method, each chunk vocoded alone (left_context = lookahead = 0).
        """
        if independent:
            left_context, lookahead = 0, 0
        for name, value, minimum in (("left_context", left_context, 0), ("lookahead", lookahead, 0),
                                     ("chunk_size", chunk_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
        return LlamaOmniVocoderStreamState(left_context=left_context, lookahead=lookahead, chunk_size=chunk_size)

    @torch.no_grad()
    def stream(self, state: LlamaOmniVocoderStreamState, new_units, final: bool = False) -> torch.Tensor:
        """Add units to the stream; return the samples that became final, FloatTensor [new_samples].

        Concatenating every returned chunk approximates `self(all_units[None])[0][0]`; `final=True` flushes
        the held-back units and closes the stream.
        """
        if state.finished:
            raise ValueError("this stream is finished (final=True was passed); start another with init_stream()")
        units = torch.as_tensor(new_units, dtype=torch.long, device=self.dict.weight.device).reshape(1, -1)
        self._check_units(units, None)
        state.units.extend(units[0].tolist())
        state.units_received += units.shape[1]
        state.finished = final
        end = state.units_received if final else state.units_received - state.lookahead
        if end - state.units_done < (1 if final else state.chunk_size):
            return self.dict.weight.new_zeros(0)
        return self._vocode_window(state, end)

    def _vocode_window(self, state: LlamaOmniVocoderStreamState, end: int) -> torch.Tensor:
        """Vocode units [units_start, units_received), return the samples of units [units_done, end)."""
        device = self.dict.weight.device
        units = torch.tensor(state.units, dtype=torch.long, device=device)[None]  # [1, W]
        num_context = state.units_done - state.units_start
        num_new = end - state.units_done
        durations = self.predict_durations(units)[0]  # [W]; context units keep the durations they were given
        durations[:num_context] = torch.tensor(state.durations, dtype=torch.long, device=device)
        wav, _ = self(units, durations=durations[None])  # [1, S]
        hop = self.config.code_hop_size
        start = int(durations[:num_context].sum()) * hop
        stop = start + int(durations[num_context : num_context + num_new].sum()) * hop
        # advance, then forget units older than the left context (the state stays bounded)
        state.durations.extend(durations[num_context : num_context + num_new].tolist())
        state.units_done = end
        state.samples_emitted += stop - start
        drop = max(0, state.units_done - state.left_context - state.units_start)
        del state.units[:drop], state.durations[:drop]
        state.units_start += drop
        return wav[0, start:stop]


def _check_vocoder_config(config: LlamaOmniVocoderConfig):
    """Shapes the generator needs so each stage multiplies the length exactly by its rate."""
    for rate, kernel in zip(config.upsample_rates, config.upsample_kernel_sizes):
        if kernel < rate or (kernel - rate) % 2:
            raise ValueError(
                f"`upsample_kernel_sizes` {kernel} with rate {rate}: kernel - rate must be even and >= 0 "
                "so the up-conv output is exactly rate times longer"
            )
    odd = [config.duration_predictor_kernel_size, *config.resblock_kernel_sizes]
    if any(k % 2 == 0 for k in odd):
        raise ValueError(f"duration predictor and resblock kernel sizes must be odd, got {odd}")
    if config.upsample_initial_channel % 2 ** len(config.upsample_rates):
        raise ValueError(
            f"`upsample_initial_channel` ({config.upsample_initial_channel}) must be divisible by "
            f"2 ** {len(config.upsample_rates)} (channels halve at each upsampling)"
        )


__all__ = ["LlamaOmniVocoder", "LlamaOmniVocoderStreamState", "fold_weight_norm"]
