"""Checkpoint I/O: weight files, the original <-> diffusers key maps, single-file load and export."""
from .files import CheckpointError, read_state_dict
from .keymaps import KeyMap, clip_keymap, openclip_keymap, unet_keymap, vae_keymap
from .models import folder_text_encoder_state, load_text_encoder_state
from .single_file import load_single_file, save_single_file

__all__ = [
    "CheckpointError",
    "KeyMap",
    "clip_keymap",
    "folder_text_encoder_state",
    "load_single_file",
    "load_text_encoder_state",
    "openclip_keymap",
    "read_state_dict",
    "save_single_file",
    "unet_keymap",
    "vae_keymap",
]
