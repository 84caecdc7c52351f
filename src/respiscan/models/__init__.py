"""Models: backbone factory (timm) and the MLP blocks of every stage."""
