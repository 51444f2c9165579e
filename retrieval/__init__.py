"""Retrieval: sentence splitting, token-aware chunking, embeddings, FAISS index, retriever."""
