"""The engine core, in the order a request travels: `request_builder` validates what a caller
sent and makes a Request (`request`) with one Sequence (`sequence`) per term, tokenised by
`tokenization`; the `scheduler` admits, batches, preempts and does each step's bookkeeping
(postprocess); `engine` runs schedule -> execute -> postprocess and owns the KV pool's life;
`detokenizer` turns tokens into text with stop strings; `engine_loop` is the one thread that
owns the engine, fed by any number of callers."""
from .engine import LLMEngine, Submission
from .engine_loop import EngineLoop, RequestUpdate, Subscriber
from .request import Request, RequestStatus
from .request_builder import NewRequest, RequestBuilder
from .sequence import Sequence

__all__ = ["EngineLoop", "LLMEngine", "NewRequest", "Request", "RequestBuilder", "RequestStatus",
           "RequestUpdate", "Sequence", "Submission", "Subscriber"]
