"""Keep the libraries quiet while Dapple loads a model: no per-file progress bars and no notices such as
transformers' "CLIPImageProcessor requires torchvision (not installed)" (Dapple never uses torchvision).

A context manager, so the user's own logging settings for transformers and diffusers are back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import diffusers
import transformers


@contextmanager
def quiet_libraries() -> Iterator[None]:
    saved = [(library.utils.logging, library.utils.logging.get_verbosity(),
              library.utils.logging.is_progress_bar_enabled()) for library in (diffusers, transformers)]
    for logging, _, _ in saved:
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        yield
    finally:
        for logging, verbosity, bars in saved:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
