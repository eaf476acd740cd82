"""The SAE and its math: the model (model), the float64 oracle (reference), the CPU backend
(torch_ops) and the backend choice (backend), schedules, margins and operand precision."""
