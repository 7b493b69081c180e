"""Where the shared offline copies live: ../shared relative to the repo root (a worktree
one level deeper also looks in ../../shared). Tests skip when a copy is absent; they never
download."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shared(*parts):
    """The first existing <candidate>/shared/<parts>, or None."""
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base.joinpath("shared", *parts)
        if path.exists():
            return path
    return None
