"""Stand-ins for the tests and the bundled sample, kept apart from the stages.

`vlm`: a loopback Qwen-VL endpoint (DashScope and OpenAI protocols, placeholder captions);
`models`: tiny random filter models; `sample_server`: the loopback proxy the sample's downloads
go through. None of them is for real data.
"""
