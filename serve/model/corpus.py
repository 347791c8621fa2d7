"""Local training text for the tiny model's tokenizer.

The tokenizer only needs to cover ordinary English, JSON and chat markup; the text is embedded so the
build is deterministic and needs no download.
"""

CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving system answers requests from many users at once.
Large language models generate text one token at a time; each new token depends on every token before it.
Continuous batching lets an engine add new requests to a running batch as soon as old ones finish.
PagedAttention stores the key and value cache in fixed-size blocks, so memory is not wasted on padding.
The gateway routes each request by its model name, checks the caller's key, and counts tokens and cost.
Frequent questions are answered from a cache filled offline by a strong teacher model.
Rare questions go to a small student model; when the student is unsure, the teacher answers instead.
What is the capital of France? The capital of France is Paris.
What is two plus two? Two plus two is four.
How do I reset my password? Open the settings page, choose security, and follow the reset link.
Where is my order? Your order is on its way and should arrive within three days.
Tell me a joke. Why did the developer go broke? Because he used up all his cache.
Summarise this paragraph in one sentence. Translate this sentence into French. Write a short poem.
You are a helpful assistant. Answer briefly and correctly. If you do not know, say so.
{"name": "Alice", "age": 30, "city": "Paris", "tags": ["a", "b"], "ok": true, "score": 0.5}
{"answer": "yes", "confidence": 0.9, "items": [1, 2, 3], "nested": {"key": "value"}, "none": null}
system user assistant: Hello! How can I help you today? Thanks, goodbye.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June
zero one two three four five six seven eight nine ten hundred thousand million 0123456789
The weather today is sunny with a light breeze. Tomorrow it may rain in the afternoon.
Kubernetes runs containers on nodes; a Helm chart describes the objects a release creates.
Prometheus scrapes metrics over HTTP; Grafana draws them as dashboards with alerts.
"""
