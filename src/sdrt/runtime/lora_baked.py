"""LoRAs baked into an export (`sdrt export --lora FILE:WEIGHT`): how model.json records them and how images made
with such a model say so in their infotext.

The record is a list in the manifest's source ({"loras": [...]}) — which files, with which weights, identified by
their sha256 and A1111's short hash — so the model's own description says what its weights are.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class BakedLora:
    """One LoRA merged into an export's weights at export time."""

    name: str  # the file stem
    sha256: str  # of the whole file
    shorthash: str  # A1111's (lora_files.shorthash)
    te: float
    unet: float

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "shorthash": self.shorthash, "te": self.te,
                "unet": self.unet}  # fmt: skip

    def weights(self) -> str:
        return f"{self.te:g}" if self.te == self.unet else f"{self.te:g}:{self.unet:g}"


def baked_loras(manifest) -> list[BakedLora]:
    """The LoRAs MANIFEST's export has merged in (none for a plain export)."""
    out = []
    for entry in manifest.source.get("loras", []) or []:
        out.append(BakedLora(str(entry["name"]), str(entry.get("sha256", "")), str(entry.get("shorthash", "")),
                             float(entry.get("te", 1.0)), float(entry.get("unet", 1.0))))  # fmt: skip
    return out


def baked_infotext(manifest) -> str | None:
    """The infotext's "Baked LoRAs" value: "name:weight: shorthash, ..." (names without ':' and ','), or None."""
    items = [f"{b.name.replace(':', '').replace(',', '')}:{b.weights()}: {b.shorthash}" for b in baked_loras(manifest)]
    return ", ".join(items) or None
