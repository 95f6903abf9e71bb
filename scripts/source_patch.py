"""Text patches of the sources for the timing-only builds (scripts/*_patch.py): each old text must occur exactly
once, so that a patch written against other sources stops instead of patching the wrong place."""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def patch_file(rel, pairs, tool):
    """Replaces each (old, new) of pairs in the repository file rel; tool names the calling script in errors."""
    path = os.path.join(ROOT, rel)
    s = open(path).read()
    for old, new in pairs:
        if s.count(old) != 1:
            sys.exit(f'{tool}: the text to patch was not found once in {rel}:\n{old}')
        s = s.replace(old, new)
    open(path, 'w').write(s)
