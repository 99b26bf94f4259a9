"""resnet-ensembles: reproduce "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks" (Veit, Wilber, Belongie, NIPS 2016) with Lightning + Hydra."""
