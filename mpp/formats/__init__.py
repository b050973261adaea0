"""Weight formats: key mappings between mpp (= official MAE / timm names) and other libraries."""
