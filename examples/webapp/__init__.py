"""Two small web applications on carnet: FastAPI and Flask, strict mode and a decrypt budget."""
