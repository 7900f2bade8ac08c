"""The customer API's wire shapes (OpenAI-compatible, extended with marketplace fields).

Requests are strict (`extra="forbid"`: a misspelled field is an error, not a
silent default); replies are what the coordinator sends and clients may read
tolerantly.
"""
