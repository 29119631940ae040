"""Text conditioning: ``model.text_encoder`` names a frozen transformers text encoder and its
tokenizer — a pipeline folder with ``text_encoder/`` and ``tokenizer/`` in it (a Stable
Diffusion checkout, an ftdiff export), a folder holding both, or a hub id already in the local
cache. Captions are encoded on the fly under ``no_grad``, exactly as diffusers' text-to-image
pipelines encode prompts (padded to the tokenizer's length, the last hidden state), so an
exported pipeline samples what ``ftdiff sample --prompt`` samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.errors import UserError

# Tokens per caption when neither the tokenizer nor the encoder sets a limit (CLIP's).
DEFAULT_MAX_TOKENS = 77


@dataclass(frozen=True)
class TextGeometry:
    hidden_size: int
    """Width of the encoder's hidden states: the denoiser's cross-attention width."""
    max_length: int
    """Tokens per caption (padded or truncated to it)."""


@functools.lru_cache(maxsize=8)
def _folder(path: str) -> Path:
    """The folder on this machine (a hub id: its snapshot in the local cache)."""
    from service.models.digest import local_folder

    return local_folder(path, f"model.text_encoder = {path!r}")


def _where(path: str, part: str) -> dict[str, Any]:
    """``from_pretrained``'s arguments for ``part`` (text_encoder or tokenizer) under ``path``."""
    folder = _folder(path)
    if (folder / "text_encoder" / "config.json").is_file():
        return {"pretrained_model_name_or_path": str(folder), "subfolder": part}
    return {"pretrained_model_name_or_path": str(folder)}


def _quiet() -> None:
    """transformers' progress bars and advice (e.g. that torchvision is missing) are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _problem(path: str, e: BaseException) -> UserError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return UserError(f"model.text_encoder = {path!r} cannot be loaded ({type(e).__name__}: {first}); give a "
                     "folder with text_encoder/ and tokenizer/ (or both in one folder), safetensors weights")


@functools.lru_cache(maxsize=8)
def _config(path: str) -> Any:
    from transformers import AutoConfig

    _quiet()
    try:
        config = AutoConfig.from_pretrained(**_where(path, "text_encoder"), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise _problem(path, e) from None
    return config


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    _quiet()
    where = _where(path, "tokenizer")
    folder = Path(where["pretrained_model_name_or_path"]) / where.get("subfolder", "")
    if not any(folder.glob("tokenizer*")) and not any(folder.glob("*vocab*")):
        raise UserError(f"model.text_encoder = {path!r}: no tokenizer in {folder} (tokenizer.json, "
                        "tokenizer_config.json, vocab files); save the encoder's tokenizer beside it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _problem(path, e) from None
    if tokenizer.pad_token is None:
        raise UserError(f"model.text_encoder = {path!r}: its tokenizer has no pad token, and captions are padded "
                        "to one length; set one (tokenizer.pad_token = tokenizer.eos_token) and save it again")
    return tokenizer


@functools.lru_cache(maxsize=8)
def text_geometry(path: str) -> TextGeometry:
    """Read from the encoder's config and the tokenizer (no weights)."""
    config = _config(path)
    text = getattr(config, "text_config", None) or config  # a whole CLIP model: its text half
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(hidden, int):
        raise UserError(f"model.text_encoder = {path!r}: its config ({type(config).__name__}) names no hidden size")
    limits = [n for n in (_tokenizer(path).model_max_length, getattr(text, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 100_000]  # an unset model_max_length is ~1e30
    return TextGeometry(hidden_size=hidden, max_length=min(limits) if limits else DEFAULT_MAX_TOKENS)


@functools.lru_cache(maxsize=8)
def text_encoder_digest(path: str) -> str:
    """A digest of the encoder's config and weights and the tokenizer's files: part of the
    run's identity, so a resume with another encoder under the same path is refused."""
    from service.models.digest import MODEL_FILES, files_digest

    setting = f"model.text_encoder = {path!r}"
    folder = _folder(path)
    folders = [folder / "text_encoder", folder / "tokenizer"] if (folder / "text_encoder").is_dir() else [folder]
    return files_digest(folders, setting, suffixes=(*MODEL_FILES, ".txt", ".model"))


# Checkpoints saved with a head or a decoder, and the encoder to load from them instead.
_ENCODER_OF = {"CLIPModel": "CLIPTextModel", "T5ForConditionalGeneration": "T5EncoderModel",
               "MT5ForConditionalGeneration": "MT5EncoderModel", "UMT5ForConditionalGeneration": "UMT5EncoderModel"}
# Heads whose first output is not the hidden states: their base model (AutoModel) is loaded.
_HEADS = ("ForMaskedLM", "ForCausalLM", "ForPreTraining", "ForSequenceClassification", "LMHeadModel")


def _encoder_class(config: Any) -> Any:
    """The transformers class that gives the hidden states of the folder's model
    (CLIPTextModel, T5EncoderModel, BertModel, ...): a whole CLIP model loads as its text half,
    a T5 with its decoder as its encoder, a model with a language-model head as its base."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if name.endswith(_HEADS):
            return transformers.AutoModel
        cls = getattr(transformers, _ENCODER_OF.get(name, name), None)
        if cls is not None:
            return cls
    return transformers.AutoModel


class TextEncoder:
    """The frozen tokenizer and encoder: captions -> hidden states (n, tokens, hidden)."""

    def __init__(self, path: str, device: str = "cpu"):
        config = _config(path)
        self.tokenizer = _tokenizer(path)
        self.max_length = text_geometry(path).max_length
        try:
            model = _encoder_class(config).from_pretrained(**_where(path, "text_encoder"), use_safetensors=True,
                                                            local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise _problem(path, e) from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        # As diffusers' pipelines do: a mask only for encoders trained with one.
        self.use_mask = bool(getattr(self.model.config, "use_attention_mask", False))
        self._probe(path)

    def _probe(self, path: str) -> None:
        """Encode one caption now: a model that loads but gives no hidden states of the
        configured width (a decoder, a head) is a config error at start-up, not a crash loop."""
        wanted = (1, self.max_length, text_geometry(path).hidden_size)
        try:
            got = tuple(self([""]).shape)
        except Exception as e:
            raise UserError(f"model.text_encoder = {path!r}: its {type(self.model).__name__} does not encode a "
                            f"caption ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}); give "
                            "a text encoder (CLIPTextModel, T5EncoderModel, BertModel, ...)") from None
        if got != wanted:
            raise UserError(f"model.text_encoder = {path!r}: its {type(self.model).__name__} gives states of shape "
                            f"{got}, not (n, {wanted[1]}, {wanted[2]}); give a text encoder (CLIPTextModel, "
                            "T5EncoderModel, BertModel, ...), not a model with a head")

    def __call__(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device) if self.use_mask else None
        with torch.no_grad():
            return self.model(tokens.input_ids.to(self.device), attention_mask=mask)[0].float()


@functools.lru_cache(maxsize=2)
def load_text_encoder(path: str, device: str = "cpu") -> TextEncoder:
    return TextEncoder(path, device)
