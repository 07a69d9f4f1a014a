"""`kad serve`: an OpenAI-compatible HTTP endpoint over the continuous-batching runtime.

By concern: `schema` (request and response bodies, errors), `app` (the FastAPI app), `worker`
(the thread that steps the runtime and hands each request its events), `command` (the CLI).
"""
