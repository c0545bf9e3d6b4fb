"""posegen: photo + pose -> avatar, as an asynchronous job queue.

The domain package shared by the three doors (API, worker, CLI). It never imports
`api` or `worker`, torch or diffusers.
"""

__version__ = "0.1.0"
