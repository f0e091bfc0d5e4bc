"""Formats of other libraries: Hugging Face PEFT LoRA folders, in and out."""

from .peft import export_peft, is_peft_folder, load_peft, save_peft_lora

__all__ = ["export_peft", "is_peft_folder", "load_peft", "save_peft_lora"]
