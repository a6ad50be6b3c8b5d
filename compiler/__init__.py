"""The compiler stages: ingest, graph, dmpq, plan, qdq, distill, verify."""
