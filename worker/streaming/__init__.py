"""Live output (SPEC §5.4): where a streamed run's ``assistantDelta`` events go, behind one
small sink interface: the post's ``replyTo`` queue, or a Redis stream per request."""
