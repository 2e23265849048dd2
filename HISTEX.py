#!/usr/bin/env python
"""Stage 5: train the TriHRGE network and write the super-resolution maps (see docs/ARCHITECTURE.md)."""
import sys


def main(argv=None):
    print("error: HISTEX.py (stage 5: the TriHRGE network) is not built yet; see issue 4. "
          "Stages 1-4 (image_calibration.py, get_HR.py, Histology_Extractor.py, masking_non_tissue.py) work.",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
