"""Token scorers: one file per method (ssToken, ESLM / Ada-ESLM, SHAD/RFT, critical tokens)."""
