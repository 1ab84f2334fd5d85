"""T5 at run time (SD 3.5's and FLUX.1's long-prompt encoder): the tokenizer export wrote (its tokenizer.json, read
with the `tokenizers` package, not transformers) and the encoder's graphs, run part after part (export/t5.py)."""

import json
from pathlib import Path

import numpy as np

from sdrt.errors import ModelError
from sdrt.runtime.flow_specs import t5_part_name


class T5Tokenizer:
    """tokenizer.json's pipeline (SentencePiece Unigram, Metaspace, "</s>" appended), then truncation and padding as
    transformers' T5 tokenizer does with padding="max_length", truncation=True: the EOS survives truncation."""

    def __init__(self, backend, pad_id: int):
        self.backend = backend
        self.pad_id = pad_id

    @classmethod
    def from_dir(cls, path) -> "T5Tokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
            config = json.loads((path / "tokenizer_config.json").read_text())
        except (OSError, ValueError, Exception) as e:  # tokenizers raises its own Exception subclass
            raise ModelError(f"T5 tokenizer in {str(path)!r} is unreadable ({e}): re-export the model") from None
        pad = config.get("pad_token", "<pad>")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = backend.token_to_id(pad)
        if pad_id is None:
            raise ModelError(f"T5 tokenizer in {str(path)!r} has no pad token {pad!r}")
        backend.no_padding()
        return cls(backend, pad_id)

    def __call__(self, texts: list[str], max_length: int) -> np.ndarray:
        """(B, max_length) int64 ids."""
        self.backend.enable_truncation(max_length)
        out = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        for row, encoding in enumerate(self.backend.encode_batch(list(texts))):
            out[row, : len(encoding.ids)] = encoding.ids
        return out


class T5Encoder:
    """The T5 encoder's part graphs: ids -> (B, T, D) last hidden states (no attention mask, as diffusers)."""

    def __init__(self, engines: dict, manifest, name: str):
        entry = manifest.models[name]
        self.names = [t5_part_name(name, i) for i in range(int(entry.get("parts", 1)))]
        missing = [n for n in self.names if n not in engines]
        if missing:
            raise ModelError(f"{manifest.folder}: the T5 encoder's parts {missing} are not loaded")
        self.engines = [engines[n] for n in self.names]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        out = self.engines[0].run({"input_ids": ids.astype(np.int64)})
        if len(self.engines) == 1:
            return out["last_hidden_state"]
        hidden, bias = out["block_output"], out["position_bias"]
        for engine in self.engines[1:]:
            out = engine.run({"hidden_states": hidden, "position_bias": bias})
            hidden = out["last_hidden_state"] if "last_hidden_state" in out else out["block_output"]
        return hidden  # (B, T, D) float32
