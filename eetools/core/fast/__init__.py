"""Paths that make exits save time without changing what is computed (up to float rounding).

`skipping` runs exited rows only through the key/value projections of later blocks,
`bypass` calls the HF modules under the bridge directly where nothing observes it (`hooked`: decode and training forwards),
`norm_shortcut` skips TransformerLens's hook-point wrapper around the norms, and `attention`
runs HF's fused attention kernel where nobody reads the attention patterns.
"""
