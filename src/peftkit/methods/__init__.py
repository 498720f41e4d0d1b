"""The PEFT methods, one file each: its config, its layers and merge, and how `peftkit train` trains it
(`METHODS`). peftkit.registry collects them."""
