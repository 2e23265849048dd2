"""Constants of the simulated tissue shared by its modules: sizes, regions, cell types, stains,
noise; and the seeded random streams."""
import numpy as np

SIZES_MM = {"small": 1.5, "medium": 3.0, "large": 6.5}
PIXEL_SIZE_RANGE_UM = (0.1, 1.0)
DEFAULT_PIXEL_SIZE_UM = 0.3
MIN_GENES, MAX_GENES = 12, 20000
DEFAULT_N_GENES = 300
RAW_FILES = ("he-raw.tif", "pixel-size-raw.txt", "cnts.tsv", "locs-raw.tsv", "radius-raw.txt", "section.json")
CELLS_PER_CHUNK = 8192       # cells whose counts are drawn at once (each chunk has its own random stream)
DENSE_LIMIT = 40_000_000     # super-pixels x genes above which truth X is written as CSR

# region labels (truth/regions.png values)
BG, STROMA, TUMOUR, IMMUNE, DUCT, LUMEN, FAT = range(7)
REGION_NAMES = ["background", "stroma", "tumour", "immune_aggregate", "duct_epithelium", "duct_lumen", "fat"]
REGION_COLOURS = [(255, 255, 255), (236, 150, 190), (120, 40, 140), (40, 50, 170), (60, 170, 90),
                  (190, 235, 240), (250, 225, 110)]

# cell types; gene-name prefix of each type's markers
CELL_TYPES = ["tumour", "epithelial", "fibroblast", "lymphocyte", "adipocyte"]
TYPE_PREFIX = ["TUMOUR", "EPITH", "STROMA", "IMMUNE", "FAT"]
T_TUM, T_EPI, T_FIB, T_LYM, T_ADI = range(5)
LIBRARY_SIZE = [320.0, 220.0, 140.0, 90.0, 200.0]   # mean counts per cell of mean size, per type
NB_DISPERSION = 0.25

# programmes: target cell types and Gaussian random field scale (um)
PROGRAMMES = [("PROG1", [T_TUM], 220.0), ("PROG2", [T_FIB, T_LYM], 380.0),
              ("PROG3", [T_TUM, T_EPI, T_FIB, T_LYM, T_ADI], 550.0), ("PROG4", [T_TUM, T_EPI], 800.0)]

# stain optical densities per unit concentration (R, G, B), natural-log Beer-Lambert; rows are unit vectors
STAIN_H = np.array([0.60, 0.72, 0.35]) / np.linalg.norm([0.60, 0.72, 0.35])
STAIN_E = np.array([0.15, 0.85, 0.45]) / np.linalg.norm([0.15, 0.85, 0.45])
GLASS_OD = np.array([0.035, 0.040, 0.030])

# per-region background stain concentrations (h, e) under the cells
REGION_H = np.array([0.0, 0.11, 0.20, 0.12, 0.12, 0.0, 0.0], np.float32)
REGION_E = np.array([0.0, 0.12, 0.40, 0.22, 0.34, 0.02, 0.01], np.float32)

STRIP_PIXELS = 6_000_000     # rows per rendered strip: this many pixels, at most 512 rows
PIXEL_NOISE = 2.2            # sd of the white noise added to each RGB channel


def _rng(seed, *stream):
    return np.random.default_rng([int(seed), *stream])
