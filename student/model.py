"""The speech LLM student: speech encoder + adapter + LLM backbone.

  encoder   default: conv subsampling (8x in time) + a small transformer over
            fbank features; or a Whisper encoder from transformers
            (`--encoder openai/whisper-small`), which takes its own features.
  adapter   stacks `stack` consecutive encoder frames and projects them with a
            two-layer MLP to the backbone's hidden size.
  backbone  any Hugging Face causal LM; by default the teacher named in the
            cache manifest (the student starts as a copy of the text LLM).

Channel T feeds the backbone the chat-templated conversation with every turn
typed; channel S the same template with each spoken user turn's speech
embeddings in place of its text (system prompts and earlier assistant turns stay
text). student/data.py builds both; pipeline/chat.py decides the positions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class StudentConfig:
    backbone: str = "data/models/teacher"
    encoder: str = "conv-transformer"  # or a Whisper model id/path
    n_mels: int = 80
    encoder_dim: int = 128
    encoder_layers: int = 2
    encoder_heads: int = 4
    encoder_subsample: int = 3  # stride-2 convolutions: 3 -> 80 ms frames, 2 -> 40 ms
    # the conv-transformer's input normalization: "utterance" (each mel bin to mean 0, variance 1 over the clip's
    # frames: a fixed channel or gain is gone, as in Kaldi's CMVN) or "none"; part of the architecture, so training,
    # evaluation and a saved student apply the same (docs/design.md, "Features that survive the room")
    feature_norm: str = "utterance"
    stack: int = 2  # adapter frame stacking (after the encoder's 8x subsampling): 160 ms a token
    adapter_hidden: int = 512
    dropout: float = 0.1
    train_encoder: bool = True
    train_adapter: bool = True
    train_backbone: bool = True
    ctc: bool = True  # a CTC head on the encoder output (speech alignment: recognise the prompt's tokens)
    # "mlp": frame stacking + MLP; "ctc-embed" (LegoSLM-style): the CTC head's token posteriors times the
    # backbone's embedding matrix, kept at the frames where CTC emits a token (greedy), so the backbone
    # reads soft token embeddings
    adapter: str = "mlp"
    # the encoder's architecture, recorded when the student is built (a pretrained toy encoder's build config, a
    # Whisper encoder's config), so a saved student loads from its own directory alone: the weights are in
    # speech.pt, nothing is read from where the encoder first came from
    encoder_arch: dict | None = None
    lora: dict | None = None  # LoRA adapters on the backbone (student.lora.LoraSettings), None: trained whole


class ConvSubsampling(nn.Module):
    """Three stride-2 convolutions: (B, T, n_mels) at 10 ms -> (B, ~T/8, dim) at 80 ms."""

    def __init__(self, n_mels: int, dim: int, layers: int = 3):
        super().__init__()
        convs = []
        for i in range(layers):
            convs += [nn.Conv1d(n_mels if i == 0 else dim, dim, kernel_size=3, stride=2, padding=1), nn.GELU()]
        self.conv = nn.Sequential(*convs)
        self.layers = layers

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames at or past a clip's length are zero before every convolution, so a clip's encoding does not
        depend on how much padding its batch adds after it (it sees zeros, as at its own edge)."""
        y = _zero_past(x, lengths).transpose(1, 2)
        for i in range(self.layers):
            y = self.conv[2 * i + 1](self.conv[2 * i](y))
            lengths = (lengths + 1) // 2
            y = _zero_past(y.transpose(1, 2), lengths).transpose(1, 2)
        return y.transpose(1, 2), lengths


def _zero_past(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, D) with the frames at t >= lengths[b] set to 0."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None].to(x.device)
    return x * keep.unsqueeze(-1).to(x.dtype)


def utterance_norm(feats: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, T, F) with each clip's mel bins normalized to mean 0, variance 1 over its own frames (t < lengths[b]);
    its padding stays 0."""
    n = lengths.to(device=feats.device, dtype=feats.dtype).clamp(min=1)[:, None, None]
    mean = _zero_past(feats, lengths).sum(1, keepdim=True) / n
    var = (_zero_past(feats - mean, lengths) ** 2).sum(1, keepdim=True) / n
    return _zero_past((feats - mean) / torch.sqrt(var + eps), lengths)


class ConvTransformerEncoder(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        if cfg.feature_norm not in ("utterance", "none"):
            raise ValueError(f"feature_norm must be utterance or none, got {cfg.feature_norm!r}")
        self.feature_norm = cfg.feature_norm
        self.norm_in = nn.LayerNorm(cfg.n_mels)
        self.subsample = ConvSubsampling(cfg.n_mels, cfg.encoder_dim, cfg.encoder_subsample)
        self.pos = nn.Parameter(torch.zeros(1, 2048, cfg.encoder_dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.encoder_dim, cfg.encoder_heads, 4 * cfg.encoder_dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.out_dim = cfg.encoder_dim

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.feature_norm == "utterance":
            feats = utterance_norm(feats.float(), lengths).to(feats.dtype)
        x, lengths = self.subsample(self.norm_in(feats), lengths)
        x = x + self.pos[:, : x.shape[1]]
        pad = torch.arange(x.shape[1], device=x.device)[None] >= lengths[:, None]
        return _zero_past(self.layers(x, src_key_padding_mask=pad), lengths), lengths


class WhisperEncoder(nn.Module):
    """A Whisper encoder from transformers over Whisper log-mel features (`pipeline.features --kind whisper`).

    Takes the stored, unpadded (B, T, n_mels) log-mel and pads every clip to
    Whisper's 30 s window the way WhisperFeatureExtractor does: padding is silence,
    which after Whisper's normalization is the clip's maximum minus 2. `config`: build
    the architecture from this WhisperConfig dict instead of loading `name_or_path`
    (a saved student, whose weights are its own).
    """

    def __init__(self, name_or_path: str, n_mels: int, config: dict | None = None):
        super().__init__()
        from transformers import WhisperConfig, WhisperModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

        if config is not None:
            self.encoder = HFWhisperEncoder(WhisperConfig.from_dict(config))
        else:
            self.encoder = WhisperModel.from_pretrained(name_or_path).get_encoder()
        self.out_dim = self.encoder.config.d_model
        self.window = 2 * self.encoder.config.max_source_positions  # input frames (3000 = 30 s at 10 ms)
        if n_mels != self.encoder.config.num_mel_bins:
            raise ValueError(
                f"{name_or_path} takes {self.encoder.config.num_mel_bins} mel bins but the speech features have "
                f"{n_mels}: extract them with `python -m pipeline.features --kind whisper "
                f"--n-mels {self.encoder.config.num_mel_bins}`"
            )

    def pad_to_window(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) -> (B, n_mels, window) with Whisper's silence after each clip."""
        B, T, M = feats.shape
        x = torch.empty(B, self.window, M, dtype=feats.dtype, device=feats.device)
        for b in range(B):
            n = min(int(lengths[b]), self.window)
            x[b, :n] = feats[b, :n]
            x[b, n:] = feats[b, :n].max() - 2.0
        return x.transpose(1, 2)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_features=self.pad_to_window(feats, lengths)).last_hidden_state
        return out, torch.clamp((lengths + 1) // 2, max=out.shape[1])


def pretrained_toy_encoder(path: str) -> dict | None:
    """The build config of a speech encoder built by `python -m toy.encoder`, or None."""
    config = Path(path) / "encoder.json"
    if not config.is_file():
        return None
    meta = json.loads(config.read_text())
    return meta if meta.get("kind") == "speechkd-toy-encoder" else None


def toy_encoder_architecture(c: dict) -> "ConvTransformerEncoder":
    """The conv-transformer at the size a toy-encoder build config (toy.encoder's, as a dict) names: what the
    build trains and what the student loads its weights into."""
    return ConvTransformerEncoder(StudentConfig(n_mels=c["n_mels"], encoder_dim=c["dim"], encoder_layers=c["layers"],
                                                encoder_heads=c["heads"], encoder_subsample=c["subsample"],
                                                feature_norm=c.get("feature_norm", "none"),  # builds before it: none
                                                dropout=0.1))  # fmt: skip


def load_toy_encoder(path: str, n_mels: int) -> "ConvTransformerEncoder":
    """The pretrained toy encoder (phoneme CTC, toy.encoder) with its weights; its CTC head is not
    part of the student."""
    meta = pretrained_toy_encoder(path)
    c = meta["config"]
    if n_mels != c["n_mels"]:
        raise ValueError(f"the encoder at {path} takes {c['n_mels']} mel bins, the speech features have {n_mels}: "
                         f"extract them with `python -m pipeline.features --n-mels {c['n_mels']}`")  # fmt: skip
    encoder = toy_encoder_architecture(c)
    state = torch.load(Path(path) / "encoder.pt", map_location="cpu", weights_only=True)
    encoder.load_state_dict(state["encoder"])
    return encoder


class Adapter(nn.Module):
    """Frame stacking + MLP projector to the backbone's hidden size."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, stack: int):
        super().__init__()
        self.stack = stack
        self.proj = nn.Sequential(nn.Linear(in_dim * stack, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        T2 = (T + self.stack - 1) // self.stack
        x = nn.functional.pad(x, (0, 0, 0, T2 * self.stack - T))
        x = x.reshape(B, T2, D * self.stack)
        return self.proj(x), (lengths + self.stack - 1) // self.stack


class SpeechLLM(nn.Module):
    """The composed student (speechkd's own speech encoder + adapter + a text LLM), with the student interface the
    objective, the loop and the evaluation use (student.interface.Student)."""

    kind = "composed"

    def __init__(self, cfg: StudentConfig, backbone=None, tokenizer=None):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.backbone = backbone if backbone is not None else AutoModelForCausalLM.from_pretrained(
            cfg.backbone, dtype=torch.float32)  # fmt: skip
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(cfg.backbone)
        from student.data import SpeechTemplate

        self.template = SpeechTemplate.from_tokenizer(self.tokenizer)
        hidden = self.backbone.get_input_embeddings().embedding_dim
        arch = cfg.encoder_arch
        pretrained = arch is not None and arch["kind"] == "toy" or (arch is None and pretrained_toy_encoder(cfg.encoder))
        if cfg.encoder == "conv-transformer":
            self.encoder = ConvTransformerEncoder(cfg)
        elif arch is not None and arch["kind"] == "toy":  # a saved student: the architecture, its own weights
            self.encoder = toy_encoder_architecture(arch["config"])
        elif arch is not None:
            self.encoder = WhisperEncoder(cfg.encoder, cfg.n_mels, config=arch["config"])
        elif pretrained:
            self.encoder = load_toy_encoder(cfg.encoder, cfg.n_mels)
            cfg.encoder_arch = {"kind": "toy", "config": pretrained_toy_encoder(cfg.encoder)["config"]}
        else:
            self.encoder = WhisperEncoder(cfg.encoder, cfg.n_mels)
            cfg.encoder_arch = {"kind": "whisper", "config": self.encoder.encoder.config.to_dict()}
        self.adapter = Adapter(self.encoder.out_dim, cfg.adapter_hidden, hidden, cfg.stack)
        # Token recognition straight from the encoder frames (80 ms each): one class per backbone token + blank
        # (the last class). Trains the encoder to hear the words the adapter then hands to the backbone.
        vocab = self.backbone.get_input_embeddings().num_embeddings
        if cfg.adapter == "ctc-embed" and not cfg.ctc:
            raise ValueError("adapter 'ctc-embed' reads the CTC head: it needs ctc=True (--ctc-weight > 0)")
        self.ctc_head = nn.Linear(self.encoder.out_dim, vocab + 1) if cfg.ctc else None
        # a new CTC head on a pretrained (frozen) encoder, or one that is the adapter, is trained
        head_trains = cfg.train_encoder or bool(pretrained) or cfg.adapter == "ctc-embed"
        for module, train in ((self.encoder, cfg.train_encoder), (self.adapter, cfg.train_adapter),
                              (self.backbone, cfg.train_backbone), (self.ctc_head, head_trains)):  # fmt: skip
            if module is not None:
                module.requires_grad_(train)
        if cfg.lora is not None:  # adapters on the backbone's LM; its own weights stay
            from student.lora import LoraSettings, apply_lora

            self.backbone = apply_lora(self.backbone, LoraSettings(**cfg.lora))

    def backbone_parameters(self):
        """The backbone LLM's parameters (LoRA adapters included), trained at --backbone-lr."""
        yield from self.backbone.parameters()

    @property
    def _backbone_model(self) -> nn.Module:
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backbone's LM head (weight, bias): the objective applies it in chunks (student.losses)."""
        lm_head = self._backbone_model.get_output_embeddings()
        return lm_head.weight, getattr(lm_head, "bias", None)

    def hidden_from_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states (B, L, H) for input embeddings: its forward with the LM head left out."""
        base = self._backbone_model
        lm_head = base.get_output_embeddings()
        base.set_output_embeddings(nn.Identity())
        try:
            return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        finally:
            base.set_output_embeddings(lm_head)

    def response_hidden(self, batch: dict, channel: str, encoded=None) -> torch.Tensor:
        """Hidden states (B, n, H) at the positions that predict the response tokens: channel T (the typed prompt)
        or S (the speech embeddings in the prompt's place); `encoded`: the encoder's output, when run already."""
        from student.data import gather_positions, speech_inputs

        if channel == "T":
            hidden = self.hidden_from_embeds(self.embed(batch["text_ids"]), batch["text_attention"])
            return gather_positions(hidden, batch["text_response_pos"])
        embeds, attention, pos = speech_inputs(self, batch, encoded=encoded)
        return gather_positions(self.hidden_from_embeds(embeds, attention), pos)
    def speech_parameters(self):
        """Parameters of the speech side: encoder, adapter and CTC head (trained at --lr)."""
        heads = [self.ctc_head] if self.ctc_head is not None else []
        for module in (self.encoder, self.adapter, *heads):
            yield from module.parameters()

    @property
    def embed(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def speech_embeddings(
        self, feats: torch.Tensor, lengths: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone-sized speech embeddings (B, T', H) and their lengths; `encoded`: the encoder's output, if run."""
        x, lengths = encoded if encoded is not None else self.encoder(feats, lengths)
        if self.cfg.adapter == "ctc-embed":
            return self._ctc_embeddings(x, lengths)
        return self.adapter(x, lengths)

    def _ctc_embeddings(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft token embeddings (posteriors @ embedding matrix) at the frames where greedy CTC emits."""
        logits = self.ctc_head(x)
        blank = logits.shape[-1] - 1
        table = self.embed.weight
        soft = logits.float().softmax(-1)[..., :blank].to(table.dtype) @ table  # (B, T, H)
        best = logits.argmax(-1)
        previous = nn.functional.pad(best, (1, 0), value=-1)[:, :-1]
        valid = torch.arange(best.shape[1], device=best.device)[None, :] < lengths[:, None]
        emit = (best != blank) & (best != previous) & valid
        rows = []
        for b in range(x.shape[0]):
            kept = soft[b, emit[b]]
            rows.append(kept if kept.shape[0] else soft[b, :1])  # nothing heard: one frame, not an empty prompt
        out_len = torch.tensor([r.shape[0] for r in rows], device=x.device)
        out = soft.new_zeros(len(rows), int(out_len.max()), soft.shape[-1])
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
        return out, out_len

    def ctc_loss(self, encoded: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor,
                 target_lengths: torch.Tensor, normalizer=None) -> torch.Tensor:  # fmt: skip
        """CTC of the encoder frames against the first `target_lengths[b]` token ids of `targets[b]`: each
        clip's loss per target token, summed over the batch and divided by `normalizer` (default: the batch
        size, i.e. torch's reduction="mean")."""
        if self.ctc_head is None:
            raise ValueError("this student has no CTC head (StudentConfig.ctc is False)")
        x, lengths = encoded
        log_probs = self.ctc_head(x).float().log_softmax(-1).transpose(0, 1)  # (T, B, C)
        blank = self.ctc_head.out_features - 1
        per_clip = nn.functional.ctc_loss(log_probs, targets, lengths, target_lengths, blank=blank,
                                          reduction="none", zero_infinity=True)  # fmt: skip
        per_token = per_clip / target_lengths.clamp_min(1).to(per_clip.dtype)
        return per_token.sum() / (len(per_clip) if normalizer is None else normalizer)

    def forward_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask).logits

    # --- evaluation: greedy answers -------------------------------------------------------------------------

    @torch.no_grad()
    def answer_text(self, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
        """Greedy answers to typed prompts (the backbone alone, in the teacher's template)."""
        from pipeline.chat import render_prompt

        self.eval()
        tok, device = self.tokenizer, self.embed.weight.device
        out = []
        for i in range(0, len(prompts), batch_size):
            rows = [self.embed(torch.tensor(tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"],
                                            device=device)) for p in prompts[i : i + batch_size]]  # fmt: skip
            out.extend(generate_from_embeds(self.backbone, tok, rows, max_new_tokens))
        return out

    @torch.no_grad()
    def answer_speech(self, clips: list, max_new_tokens: int) -> list[str]:
        """Greedy answers to spoken prompts (one batch of feature clips)."""
        from student.data import pad_speech

        self.eval()
        device = self.embed.weight.device
        prefix = self.embed(torch.tensor(self.template.prefix_ids, dtype=torch.long, device=device))
        suffix = self.embed(torch.tensor(self.template.suffix_ids, dtype=torch.long, device=device))
        padded = pad_speech(clips)
        sp, lens = self.speech_embeddings(padded["speech"].to(device), padded["speech_lengths"].to(device))
        rows = [torch.cat([prefix, sp[b, : lens[b]], suffix]) for b in range(len(clips))]
        return generate_from_embeds(self.backbone, self.tokenizer, rows, max_new_tokens)

    # --- save / load ------------------------------------------------------------------------------------------

    def save(self, out_dir: Path, tokenizer=None, merge: bool = False) -> None:
        """final/: the backbone in HF format (with LoRA: the adapters merged into it, and the adapter alone in
        PEFT's format under adapter/), the speech side's weights and architecture; it loads from this directory
        alone. (`merge`: LoRA adapters are always merged into backbone/ here.)"""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if self.cfg.lora is not None:
            import copy

            self.backbone.save_pretrained(out_dir / "adapter")
            backbone = copy.deepcopy(self.backbone).merge_and_unload()
        backbone.save_pretrained(out_dir / "backbone")
        (tokenizer or self.tokenizer).save_pretrained(out_dir / "backbone")
        speech = {"encoder": self.encoder.state_dict(), "adapter": self.adapter.state_dict()}
        if self.ctc_head is not None:
            speech["ctc_head"] = self.ctc_head.state_dict()
        torch.save(speech, out_dir / "speech.pt")
        (out_dir / "student_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, out_dir: Path) -> "SpeechLLM":
        """A saved student from its directory alone (the backbone in HF format, the speech side's architecture from
        student_config.json, its weights from speech.pt)."""
        out_dir = Path(out_dir)
        # a student saved before feature_norm existed normalized nothing
        cfg = StudentConfig(**{"feature_norm": "none", **json.loads((out_dir / "student_config.json").read_text())})
        cfg.backbone = str(out_dir / "backbone")
        cfg.lora = None  # backbone/ has the adapters merged in
        model = cls(cfg)
        state = torch.load(out_dir / "speech.pt", map_location="cpu", weights_only=True)
        model.encoder.load_state_dict(state["encoder"])
        model.adapter.load_state_dict(state["adapter"])
        if model.ctc_head is not None and "ctc_head" in state:
            model.ctc_head.load_state_dict(state["ctc_head"])
        return model


@torch.no_grad()
def generate_from_embeds(backbone, tokenizer, rows: list[torch.Tensor], max_new_tokens: int) -> list[str]:
    """Greedy continuation of left-padded input embeddings (on the rows' device)."""
    L = max(r.shape[0] for r in rows)
    H = rows[0].shape[-1]
    device = rows[0].device
    embeds = torch.zeros(len(rows), L, H, dtype=rows[0].dtype, device=device)
    mask = torch.zeros(len(rows), L, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        embeds[b, L - r.shape[0] :] = r
        mask[b, L - r.shape[0] :] = 1
    out = backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.batch_decode(out, skip_special_tokens=True)
