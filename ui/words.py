"""What the app says about a model and its engine, in the words a lecture uses (one place for the sentences)."""
from __future__ import annotations

import html
import re

from core import data, engine
from core.checkpoints import Checkpoint


_MARKDOWN = re.compile(r"([\\\[\]<>$*~])")   # links and images, directives (:red[...]), HTML, LaTeX, emphasis
_LINE_START = re.compile(r"^(\s*)([#>+=-]|\d+(?=[.)]))")   # a heading, quote, list or rule if it opened the text


def plain(text: object) -> str:
    """`text` as literal words in Streamlit's markdown (st.error, st.caption, labels): whatever a file
    named itself or a message quoted from it, no link, image, colour, formula or heading can form, and
    it stays one line. The characters still show: `[x](y)` reads as typed."""
    text = " ".join(str(text).splitlines())
    text = _MARKDOWN.sub(r"\\\1", text)
    text = re.sub(r":(?=\w)", r"\\:", text)  # :red, :material/...: are directives even without brackets
    # No bare link either: the markdown renderer links "http://" and "www." even when escaped, so an
    # invisible zero-width space breaks them (the text reads the same).
    text = text.replace("://", ":/\u200b/").replace("www.", "www\u200b.")
    return _LINE_START.sub(lambda m: m.group(1) + ("\\" + m.group(2) if not m.group(2).isdigit()
                                                   else m.group(2) + "\\"), text, count=1)


def plot_text(text: object) -> str:
    """`text` as literal words in a Plotly title, legend or hover label (they read <a>, <b>, <br> as tags
    and %{...} as a template)."""
    return html.escape(" ".join(str(text).splitlines())).replace("%{", "%&#123;")


def speed_note(eng: engine.Engine) -> str:
    """Why the whole curve is (or is not) precomputed, in plain words."""
    if eng.path == engine.PATH_FAST:
        return ""
    if eng.path == engine.PATH_HOOK:
        return ("This model cannot be split at this layer, so every K runs the whole model over the test set; "
                "the accuracy is computed when you release the slider.")
    return ("After this layer, the network mixes channels before its classifier, so every K needs a pass of the "
            "rest of the network over the test set; the accuracy is computed when you release the slider.")


def evaluation_in_words(eng: engine.Engine) -> str:
    """How this engine evaluates a K, for the UI; with the technical reason where the fast path does
    not apply (`Engine.fast_reason`)."""
    if eng.path == engine.PATH_FAST:
        return "The whole accuracy curve of this layer comes from one pass over the test set."
    return speed_note(eng) + (f" Why: {eng.fast_reason}." if eng.fast_reason else "")


def summary_in_words(ckpt: Checkpoint) -> str:
    """The summary of a checkpoint's architecture (registered, or a .pt2 program), and what it reproduces."""
    text = ckpt.spec.summary[:1].upper() + ckpt.spec.summary[1:]
    return text + (f" (after {ckpt.spec.provenance})" if ckpt.spec.provenance else "")


def parameter_count(ckpt: Checkpoint) -> int:
    """The model's parameters as the slim table counts them (`model.parameters()`: no running statistics)."""
    return sum(v.numel() for k, v in ckpt.state_dict.items() if not k.endswith(("running_mean", "running_var",
                                                                                 "num_batches_tracked")))


def chance_level(ckpt: Checkpoint) -> float | None:
    """Accuracy of guessing: 1 / number of classes (a half for the pair networks)."""
    spec = data.DATASETS.get(ckpt.dataset)
    return 1 / len(spec.class_names) if spec else None
