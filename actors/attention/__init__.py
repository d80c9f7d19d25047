"""The attention worker process: worker, scheduler, KV blocks and paged cache, the in-process engine, the remote step
and token dispatch."""
