"""Model helpers: tiny local models for tests and CPU runs, and model loading."""
