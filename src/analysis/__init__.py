"""Post-training measurements of the paper (lesions, paths) as Lightning callbacks."""
