"""The tiny shapes world: its palette and captions, its drawing, its datasets and concepts, the readers that tell a
generated image's attributes, the scores built on them, and its tiny T5 tokenizer."""
