"""The transformers of the flow families as MODEL(x, t, feeds) -> v for flow.FlowDenoiser: SD 3's MMDiT takes the
latents as they are; FLUX's takes them packed in 2x2 patches with per-token position ids, its timestep as sigma and,
guidance-distilled (dev), the guidance scale as an input. Latents stay (B, C, h, w) everywhere else."""

import numpy as np

PACK = 2  # FLUX: 2x2 latent cells per transformer token


def pack(x: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token, channels (C, dy, dx) (diffusers' _pack_latents)."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // PACK, PACK, w // PACK, PACK).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK))


def unpack(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """pack's inverse: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, packed = tokens.shape
    c = packed // (PACK * PACK)
    x = tokens.reshape(b, h // PACK, w // PACK, c, PACK, PACK).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(b, c, h, w))


def image_ids(h: int, w: int) -> np.ndarray:
    """(h/2 * w/2, 3) float32 position ids of the packed tokens: (0, row, column) (diffusers'
    _prepare_latent_image_ids)."""
    rows, cols = np.meshgrid(np.arange(h // PACK), np.arange(w // PACK), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1)
    return ids.reshape(-1, 3).astype(np.float32)


def check_packable(h: int, w: int, latent_downsample: int) -> None:
    """FLUX packs 2x2 latent cells: image sides must be multiples of 2 x the VAE's downsampling."""
    from sdrt.errors import InvalidOption

    step = PACK * latent_downsample
    for field, cells in (("height", h), ("width", w)):
        if cells % PACK:
            raise InvalidOption(field, cells * latent_downsample, f"a multiple of {step} for FLUX models")


class Sd3Model:
    """SD 3's transformer: feeds {"encoder_hidden_states", "pooled_projections"}; t in [0, 1000]. BLOCKS: the
    transformer's block count when its graph takes block gates (1: run the block, 0: pass its input through; every
    block runs unless SKIP names it), else None."""

    def __init__(self, engine, blocks: int | None = None):
        self.engine, self.blocks = engine, blocks

    def __call__(self, x: np.ndarray, t: np.float32, feeds: dict, skip: tuple[int, ...] = ()) -> np.ndarray:
        inputs = {"hidden_states": x.astype(np.float32), "timestep": np.full(len(x), t, dtype=np.float32), **feeds}
        if self.blocks is not None:
            gates = np.ones(self.blocks, dtype=np.float32)  # (blocks,)
            gates[list(skip)] = 0.0
            inputs["block_gates"] = gates
        return self.engine.run(inputs)["out_sample"]


class FluxModel:
    """FLUX's transformer: packs x, adds position ids (text ids are zeros, as diffusers), timestep t / 1000 (the
    model scales it back), and GUIDANCE (the distilled guidance scale; None for schnell) when the graph takes it."""

    def __init__(self, engine, guidance: float | None):
        self.engine = engine
        self.guidance = None if guidance is None else np.float32(guidance)

    def __call__(self, x: np.ndarray, t: np.float32, feeds: dict) -> np.ndarray:
        b, _, h, w = x.shape
        tokens = feeds["encoder_hidden_states"].shape[1]
        inputs = {
            "hidden_states": pack(x.astype(np.float32)),
            "timestep": np.full(b, np.float32(t) / np.float32(1000), dtype=np.float32),
            "img_ids": image_ids(h, w),
            "txt_ids": np.zeros((tokens, 3), dtype=np.float32),
            **feeds,
        }
        if self.guidance is not None:
            inputs["guidance"] = np.full(b, self.guidance, dtype=np.float32)
        return unpack(self.engine.run(inputs)["out_sample"], h, w)
