from twisted.application.service import ServiceMaker

dynllm = ServiceMaker(
    "dynllm",
    "dynllm.tap",
    "OpenAI-compatible proxy that runs local inference servers on demand.",
    "dynllm",
)
