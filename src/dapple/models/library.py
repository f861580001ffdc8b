"""Model folders: where a user's checkpoints, VAEs, LoRAs and embeddings live, in A1111's or ComfyUI's layout.

A1111 (stable-diffusion-webui/):   models/Stable-diffusion, models/VAE, models/Lora, embeddings
ComfyUI (ComfyUI/):                models/checkpoints, models/vae, models/loras, models/embeddings

Pointing Dapple at either root (or at a folder holding both kinds of subfolders) finds them. Files are named by
their file name without extension (a diffusers folder by its folder name), as A1111 shows them; a name is looked
up only inside the configured folders and what it finds must stay inside once symlinks are resolved, so a name
from a web request can never reach another file on the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dapple.errors import ModelLoadError

KINDS = ("checkpoints", "vae", "loras", "embeddings")
LAYOUTS: dict[str, dict[str, str]] = {
    "a1111": {"checkpoints": "models/Stable-diffusion", "vae": "models/VAE", "loras": "models/Lora",
              "embeddings": "embeddings"},
    "comfyui": {"checkpoints": "models/checkpoints", "vae": "models/vae", "loras": "models/loras",
                "embeddings": "models/embeddings"},
}
SUFFIXES: dict[str, tuple[str, ...]] = {
    "checkpoints": (".safetensors", ".ckpt", ".pt", ".pth"),
    "vae": (".safetensors", ".ckpt", ".pt"),
    "loras": (".safetensors",),
    "embeddings": (".safetensors", ".pt", ".bin"),
}


@dataclass(frozen=True)
class ModelEntry:
    """One model file (or diffusers folder) found in the folders."""

    kind: str
    name: str
    path: Path

    @property
    def size(self) -> int:
        if self.path.is_dir():
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return self.path.stat().st_size


@dataclass(frozen=True)
class ModelFolders:
    """The folders searched for each kind of file, in order."""

    checkpoints: tuple[Path, ...] = ()
    vae: tuple[Path, ...] = ()
    loras: tuple[Path, ...] = ()
    embeddings: tuple[Path, ...] = field(default=())

    @classmethod
    def from_root(cls, root: str | Path) -> ModelFolders:
        """The A1111 and ComfyUI subfolders that exist under root; an error if there are none."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ModelLoadError(f"models folder {root} does not exist")
        found: dict[str, list[Path]] = {kind: [] for kind in KINDS}
        for layout in LAYOUTS.values():
            for kind, relative in layout.items():
                folder = root / relative
                if folder.is_dir() and folder not in found[kind]:
                    found[kind].append(folder)
        if not any(found.values()):
            expected = "; ".join(f"{name}: {', '.join(layout.values())}" for name, layout in LAYOUTS.items())
            raise ModelLoadError(f"{root} holds none of the model folders Dapple knows ({expected})")
        return cls(**{kind: tuple(folders) for kind, folders in found.items()})

    def folders(self, kind: str) -> tuple[Path, ...]:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: allowed are {', '.join(KINDS)}")
        return getattr(self, kind)

    def entries(self, kind: str) -> list[ModelEntry]:
        """Every model of a kind, sorted by name: files with the kind's suffixes, and for checkpoints and VAEs
        also diffusers folders (model_index.json / config.json)."""
        found: dict[str, ModelEntry] = {}
        for folder in self.folders(kind):
            root = folder.resolve()
            for path in sorted(folder.rglob("*")):
                if not path.resolve().is_relative_to(root):
                    continue  # a symlink out of the folder is never listed
                if path.is_file() and path.suffix.lower() in SUFFIXES[kind]:
                    if any(parent.name in ("unet", "vae", "text_encoder") for parent in path.parents):
                        continue  # the weights inside a diffusers folder
                    found.setdefault(path.stem, ModelEntry(kind, path.stem, path))
                elif path.is_dir() and self._is_diffusers_folder(kind, path):
                    found.setdefault(path.name, ModelEntry(kind, path.name, path))
        return [found[name] for name in sorted(found, key=str.lower)]

    @staticmethod
    def _is_diffusers_folder(kind: str, path: Path) -> bool:
        if kind == "checkpoints":
            return (path / "model_index.json").is_file()
        if kind == "vae":
            return (path / "config.json").is_file()
        return False

    def find(self, kind: str, name: str) -> Path:
        """The model of `kind` called `name`, or an error listing what there is."""
        if not name or "/" in name or "\\" in name or ".." in name:
            raise ModelLoadError(f"{name!r}: models are chosen by name (a file name without folders or '..')")
        for entry in self.entries(kind):
            if entry.name == name or entry.path.name == name:
                return entry.path
        names = [entry.name for entry in self.entries(kind)]
        listing = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise ModelLoadError(f"no {kind[:-1] if kind.endswith('s') else kind} named {name!r}; available: "
                             f"{listing or 'none'}")
