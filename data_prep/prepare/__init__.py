"""The prepare stage: `sampling` (temperature budgets, held-out split, seeded selection), `packing` (sentences ->
framed blocks), `chunk` (one unit of work, no Ray) and `stage` (the Ray shell and the manifest)."""
