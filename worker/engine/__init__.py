"""The inference engine: images and parameters in, images out.

It knows nothing of HTTP or the database. Small parts: pose extraction (`pose/`), skeleton
drawing (`skeleton`), model resolution (`resolve`), the family -> pipeline table
(`families`), the pipeline cache (`cache`) and the run (`run`). Fitting photos to the model's
resolution is the shared rule in `posegen.images.fit`.
"""
