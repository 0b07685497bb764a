"""A trained run, loaded: TokCom (`tokcom.TokCom`), the autoregressive baseline
(`autoregressive.AutoregressiveLM`), and `load`, which tells them apart."""
