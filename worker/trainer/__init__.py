"""The QLoRA trainer that runs inside the job container; the only code that imports torch and friends."""
