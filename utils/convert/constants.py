"""Names and limits the converters share: spot geometry, image suffixes, table size limits."""
from ..evaluation.truth import SPOT_SPACING_UM

GENE_EXPRESSION = "Gene Expression"
VISIUM_SPOT_SPACING_UM = SPOT_SPACING_UM    # centre to centre, hexagonal: 100 um
SPACERANGER_SPOT_DIAMETER_UM = 65.0  # what scalefactors' spot_diameter_fullres spans (Space Ranger >= 1.3 docs)
TSV_LIMIT = 20_000_000               # spots x genes above which --counts-format auto writes cnts.h5ad

# Space Ranger's downscaled and QC images: never the main image
DOWNSCALED_IMAGES = {
    "tissue_hires_image": "Space Ranger's downscaled 'hires' image (2,000 px on its longest side for a 6.5 mm "
                          "Visium capture area, 4,000-6,000 px for 11 mm / Visium HD)",
    "tissue_lowres_image": "Space Ranger's downscaled 'lowres' image (600 px on its longest side)",
    "aligned_fiducials": "a Space Ranger QC image (the size of tissue_hires_image.png)",
    "detected_tissue_image": "a Space Ranger QC image (the size of tissue_hires_image.png)",
    "aligned_tissue_image": "a Space Ranger QC image (the CytAssist/microscope registration checkerboard)",
    "cytassist_image": "the CytAssist instrument image (about 3,000 px, eosin only)",
}
OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.btf")
CONTENT_NAMES = {"JPEG": "he-raw.jpg", "PNG": "he-raw.png"}   # by the file's content (image_io.sniff_format)
