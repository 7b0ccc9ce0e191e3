"""Ways in from outside Python: the `lmarith` command (`cli` dispatches to `cli_generate`,
`cli_serve` and `cli_bench`, with `cli_common` flags and `arguments` for --model/--preset;
`plots` draws the latency figure) and `openai/`, the OpenAI-compatible HTTP server."""
